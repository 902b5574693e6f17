#!/usr/bin/env bash
# `make demo`: build the offline demo assets, then run the real DAG on them with
# `airflow dags test` (embedded defaults: SQLite, local artifacts, local MLflow).
set -euo pipefail
source "$(dirname "$0")/airflow_env.sh"
cd "$ROOT"
started=$(date +%s)

echo ">> demo assets (.rlhf/demo)"
rlhf demo init --out .rlhf/demo

echo ">> Airflow metadata DB ($AIRFLOW_HOME)"
airflow db migrate > "$AIRFLOW_HOME/migrate.log" 2>&1 || { tail -20 "$AIRFLOW_HOME/migrate.log"; exit 1; }

echo ">> airflow dags test rlhf_tuning (log: .rlhf/last_demo.log)"
# the demo plays the admin: its config is the base config (the form cannot override
# governance fields, and only the admin's config lets a simulated panel promote)
conf="{\"config_file\": \"$ROOT/.rlhf/demo/demo.yaml\"}"
RLHF_BASE_CONFIG="$ROOT/.rlhf/demo/demo.yaml" AIRFLOW__LOGGING__LOGGING_LEVEL=INFO airflow dags test rlhf_tuning -c "$conf" > "$ROOT/.rlhf/last_demo.log" 2>&1 || true
grep -oE "\[DAG TEST\] end task task_id=[a-z_.]+" "$ROOT/.rlhf/last_demo.log" | sed 's/.*task_id=/   done: /' || true
if ! grep -qE "DagRun Finished: .*state=success" "$ROOT/.rlhf/last_demo.log"; then
  grep -E "rlhf: error|exited with code" "$ROOT/.rlhf/last_demo.log" | tail -5 || true
  echo "!! the DAG run did not succeed; full log: .rlhf/last_demo.log"; exit 1
fi
python - <<'PY'
import glob, json, os
runs = sorted(glob.glob(".rlhf/artifacts/rlhf_tuning/*/"), key=os.path.getmtime)
run = runs[-1]
print(f"\nrun folder: {run}")
for kind in ("preference", "prompt", "eval", "sft"):
    if not os.path.exists(f"{run}validate_{kind}/report.json"):
        continue
    report = json.load(open(f"{run}validate_{kind}/report.json"))
    reasons = ", ".join(f"{n} {r}" for r, n in report["quarantined_by_reason"].items()) or "none"
    print(f"  {kind:<10} read {report['rows_read']:>5}  kept {report['rows_kept']:>5}  "
          f"quarantined {report['rows_quarantined']:>3} ({reasons})")
reward = json.load(open(f"{run}reward/model/reward_model.json"))
print(f"  reward model: held-out pairwise accuracy {reward['heldout']['accuracy']:.3f} "
      f"on {reward['heldout']['pairs']} pairs; reference-policy score mean "
      f"{reward['normalisation']['mean']:.3f}, std {reward['normalisation']['std']:.3f}")
if os.path.exists(f"{run}sft/model/sft_summary.json"):
    sft = json.load(open(f"{run}sft/model/sft_summary.json"))
    print(f"  SFT baseline: {sft['steps']} steps on {sft['train_rows']} rows, "
          f"train loss {sft['train_loss']:.3f}")
ppo = json.load(open(f"{run}ppo/model/ppo_summary.json"))
print(f"  PPO: {ppo['updates']} updates in {ppo['seconds']:.0f} s; normalised reward "
      f"{ppo['reward_first']:+.3f} -> {ppo['reward_last']:+.3f}; KL to reference {ppo['kl_last']:.3f}")
ev = json.load(open(f"{run}evaluate/evaluate.json"))
d = ev["decoding"]
print(f"  evaluation: {ev['prompts']} eval prompts per model, temperature {d['temperature']}, "
      f"up to {d['max_new_tokens']} new tokens, seed {d['seed']}")
for name, m in ev["metrics"].items():
    print(f"    {name:<11} reward {m['reward_mean']:+.3f}  length {m['length_mean']:.1f} tokens  "
          f"missing EOS {m['missing_eos_rate']:.1%}")

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
import mlflow
from rlhf_tasks import config
cfg = config.load(f"{run}config.json")
mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
client = mlflow.MlflowClient()
version = client.get_model_version(gate["model_name"], gate["version"])
aliases = ", ".join(version.aliases) or "none"
print(f"Registry: {gate['model_name']} version {gate['version']} (aliases: {aliases}); "
      f"reward model {gate['reward_model_name']} version {gate['reward_model_version']}")
PY

echo
echo "Done in $(( $(date +%s) - started )) s."
echo "  artifacts:   $ROOT/.rlhf/artifacts/rlhf_tuning/"
echo "  Data Docs:   $ROOT/.rlhf/artifacts/rlhf_tuning/<run>/validate_preference/data_docs/index.html"
echo "  PPO curves:  MLflow run 'ppo' of the pipeline run, artifact ppo/curves.png"
echo "  panel:       $ROOT/.rlhf/artifacts/rlhf_tuning/<run>/gate/report.html"
echo "  review page: .venv/bin/rlhf review serve --config .rlhf/demo/demo.yaml"
echo "  MLflow UI:   .venv/bin/mlflow ui --backend-store-uri sqlite:///$ROOT/.rlhf/mlflow.db --port 5000"
echo "  log:         .rlhf/last_demo.log"
