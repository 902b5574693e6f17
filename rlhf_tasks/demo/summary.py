"""What ``make demo`` and ``make demo-real`` print after the DAG run: the data, the steps'
headlines and the case-study table of the newest run under an artifact root.

    python -m rlhf_tasks.demo.summary CONFIG
"""

from __future__ import annotations

import glob
import json
import os
import sys


def newest_run(artifact_root: str, pipeline: str) -> str:
    runs = sorted(glob.glob(os.path.join(artifact_root, pipeline, "*", "")),
                  key=os.path.getmtime)
    if not runs:
        raise SystemExit(f"no run under {artifact_root}/{pipeline}")
    return runs[-1]


def print_summary(config_path: str) -> None:
    from rlhf_tasks import config

    base = config.load(config_path)
    run = newest_run(base.storage.artifact_root, base.run.pipeline)
    print(f"\nrun folder: {run}")
    for kind in ("preference", "prompt", "eval", "sft"):
        if not os.path.exists(f"{run}validate_{kind}/report.json"):
            continue
        report = json.load(open(f"{run}validate_{kind}/report.json"))
        reasons = ", ".join(f"{n} {r}" for r, n in report["quarantined_by_reason"].items()) \
            or "none"
        print(f"  {kind:<10} read {report['rows_read']:>5}  kept {report['rows_kept']:>5}  "
              f"quarantined {report['rows_quarantined']:>3} ({reasons})")
    reward = json.load(open(f"{run}reward/model/reward_model.json"))
    print(f"  reward model: held-out pairwise accuracy {reward['heldout']['accuracy']:.3f} "
          f"on {reward['heldout']['pairs']} pairs; foundation-policy score mean "
          f"{reward['normalisation']['mean']:.3f}, std {reward['normalisation']['std']:.3f}")
    if os.path.exists(f"{run}sft/model/sft_summary.json"):
        sft = json.load(open(f"{run}sft/model/sft_summary.json"))
        print(f"  SFT baseline: {sft['steps']} steps on {sft['train_rows']} rows, "
              f"train loss {sft['train_loss']:.3f}")
    ppo = json.load(open(f"{run}ppo/model/ppo_summary.json"))
    print(f"  PPO from the {ppo.get('init_from', 'foundation')} policy: {ppo['updates']} "
          f"updates in {ppo['seconds']:.0f} s; normalised reward {ppo['reward_first']:+.3f} -> "
          f"{ppo['reward_last']:+.3f}; KL to reference {ppo['kl_last']:.3f}")
    history = json.load(open(f"{run}ppo/model/history.json"))
    print("    update  reward     KL  kl_slope  entropy  length  clipfrac")
    for h in history:
        print(f"    {h['update']:>6} {h['reward_mean']:+7.3f} {h['kl']:6.3f} "
              f"{h.get('kl_slope', 0.0):+9.3f} {h.get('entropy', float('nan')):8.3f} "
              f"{h['response_length']:7.1f} {h.get('policy_clipfrac', float('nan')):9.3f}")
    ev = json.load(open(f"{run}evaluate/evaluate.json"))
    d = ev["decoding"]
    print(f"  evaluation: {ev['prompts']} eval prompts per model, temperature "
          f"{d['temperature']}, up to {d['max_new_tokens']} new tokens, seed {d['seed']}")
    for name, m in ev["metrics"].items():
        print(f"    {name:<11} reward {m['reward_mean']:+.3f}  length {m['length_mean']:.1f} "
              f"tokens  missing EOS {m['missing_eos_rate']:.1%}")

    from rlhf_tasks.panel.report import text_table

    gate = json.load(open(f"{run}gate/gate.json"))
    label = "SIMULATED expert panel (rubric raters with per-rater noise)" if gate["simulated"] \
        else "expert panel"
    kappa = "undefined" if gate["kappa"] is None else f"{gate['kappa']:.2f}"
    print(f"\nCase study: {label}; {gate['progress']['verdicts_given']} verdicts, "
          f"{gate['progress']['verdicts_per_item']} per item, Fleiss' kappa {kappa}")
    print(text_table(gate["table"]))
    g = gate["gate"]
    vs = (f" vs {g['reference']} {g['reference_pass_rate']:.1%}: lift {g['lift']:+.1%}, "
          f"better on {g['better']} prompts, worse on {g['worse']}, exact McNemar "
          f"p = {g['p_value']:.2g}" if g["reference"] else "")
    print(f"\nGate: {gate['decision'].upper()}{vs}")
    for reason in g["reasons"]:
        print(f"  - {reason}")
    if g.get("sequential"):
        from rlhf_tasks.panel.report import sequential_line

        print(f"  {sequential_line(g['sequential'])}")
    for other, c in (gate.get("comparisons") or {}).items():
        if other != g["reference"]:
            print(f"  vs {other}: lift {c['lift']:+.1%}, better on {c['better']} prompts, worse "
                  f"on {c['worse']}, exact McNemar p = {c['p_value']:.2g} (reported, not gated)")
    agreement = gate.get("reward_agreement") or {}
    if agreement:
        print("Reward vs panel (AUC of the reward over the verdicts): " + ", ".join(
            f"{m} {'n/a' if a is None else f'{a:.2f}'}" for m, a in agreement.items()))
    for warning in gate.get("warnings") or []:
        print(f"  ! {warning}")
    if gate.get("benefit_and_cost"):
        from rlhf_tasks.panel.cost import text_table as cost_table

        print()
        print(cost_table(gate["benefit_and_cost"]))

    import mlflow

    cfg = config.load(f"{run}config.json")
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    version = mlflow.MlflowClient().get_model_version(gate["model_name"], gate["version"])
    aliases = ", ".join(version.aliases) or "none"
    print(f"Registry: {gate['model_name']} version {gate['version']} (aliases: {aliases}); "
          f"reward model {gate['reward_model_name']} version {gate['reward_model_version']}")


if __name__ == "__main__":
    print_summary(sys.argv[1])
