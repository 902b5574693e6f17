"""Panel steps: ``panel_simulate`` (the demo's raters), ``gate`` (aggregate, report, decide,
register) and ``promote`` (move the registry aliases).

``gate`` runs once the panel has quorum (or its deadline passed: then it rejects, since
the panel has not spoken).  It first closes the review batch (later verdicts get 409, and
a retried gate reads the same snapshot).  It registers the candidate and its reward model
as new versions whatever the decision, tagged with the figures; a rejected version is
tagged with the reason and no alias moves.  A simulated panel's verdict is a report, not
a decision, unless the base config sets ``panel.simulated_may_promote`` (the demo does).

``promote`` runs only after a ``promote`` decision, and rechecks what it acts on: the
decision itself, the approver's recorded approval when ``panel.approver`` is set (an
Approve by that user, who did not trigger the run: a sign-off task marked successful by
hand records nothing, so nothing moves), and that the champion is still the version the
gate compared against.  Both aliases of both models move as one (``registry.promote``).
"""

from __future__ import annotations

import json
import logging
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

from rlhf_tasks import compute, registry, tracking, training
from rlhf_tasks.errors import BadInput
from rlhf_tasks.panel import aggregate as agg
from rlhf_tasks.panel import cost, report
from rlhf_tasks.panel.gate import (CANDIDATE, EXPERT, GatePolicy, bake_off, paired_comparisons,
                                   reference_model, reward_hacking)
from rlhf_tasks.panel.store import PanelStore, panel_store_url
from rlhf_tasks.storage import Storage, join

log = logging.getLogger(__name__)


def _evaluation(cfg, storage: Storage) -> dict:
    uri = cfg.step_uri("evaluate", "evaluate.json")
    if not storage.exists(uri):
        raise BadInput("no evaluation for this run: run the evaluate step first", file=uri)
    return storage.read_json(uri)


def panel_simulate(cfg) -> dict:
    from rlhf_tasks.panel.simulated import raters, run_panel

    if cfg.panel.mode != "simulated":
        raise BadInput("panel.mode is 'human': reviewers judge in the review page",
                       field="panel.mode")
    storage = Storage.from_config(cfg)
    batch_id = _evaluation(cfg, storage)["batch_id"]
    sim = cfg.panel.simulated
    with PanelStore(panel_store_url(cfg)) as store:
        given = run_panel(store, batch_id, raters(cfg.panel.simulated_raters, sim.noise,
                                                  sim.strictness, cfg.run.seed),
                          seed=cfg.run.seed)
        progress = store.progress(batch_id)
    return {"batch_id": batch_id, "verdicts": given, "simulated": True, **progress}


def _data_sizes(cfg, storage: Storage, candidates) -> dict[str, str]:
    def rows(kind: str) -> int | None:
        try:
            return len(training.read_canonical(cfg, storage, kind))
        except BadInput:
            return None

    prefs, prompts, sft = rows("preference"), rows("prompt"), rows("sft")
    sizes = {"foundation": "base checkpoint, no tuning", "reference": "written by experts"}
    if sft:
        sizes["sft"] = f"{sft:,} SFT examples"
    if prefs is not None:
        from rlhf_tasks.steps.ppo import rl_data_description

        for c in candidates:  # DPO learns from the pairs alone, RL from the prompts too
            sizes[c.label] = (rl_data_description(cfg, prompts, prefs) if c.step == "ppo"
                              else ("SFT + " if cfg.rl_start == "sft" else "")
                              + f"{prefs:,} preference pairs")
    return sizes


def _training_summary(storage: Storage, cfg, candidate) -> dict:
    """The candidate's training summary (``ppo_summary.json`` / ``dpo_summary.json``)."""
    return storage.read_json(join(cfg.step_uri(candidate.folder, "model"),
                                  f"{candidate.step}_summary.json"))


def _reward_checks(cfg, result, answers: list[dict], evaluation: dict,
                   summaries: dict[str, dict]) -> tuple[dict, list[str]]:
    """Reward hacking in sight: per model, the agreement (AUC) between the reward score and
    the panel's majority verdicts on its answers; and the warnings, per candidate: its
    reward rose clearly over its starting model while its pass rate did not, and the RL
    curves' drift (``ppo.drift``)."""
    rewards: dict[str, dict[int, float]] = {}
    for row in answers:
        if row.get("reward") is not None:
            rewards.setdefault(row["model"], {})[int(row["prompt_index"])] = float(row["reward"])
    agreement = {m: agg.reward_agreement(outcomes, rewards.get(m, {}))
                 for m, outcomes in result.outcomes.items()}
    means = {m: d["reward_mean"] for m, d in (evaluation.get("metrics") or {}).items()}
    warnings = []
    for label, summary in summaries.items():
        prefix = "" if label == CANDIDATE else f"{label}: "  # a bake-off's candidate
        start = summary.get("init_from", "foundation")
        start = start if start in evaluation.get("models", {}) else None
        flag = reward_hacking(means, result, label, start, cfg.panel.reward_rise_flag)
        warnings += [prefix + w for w in [flag] * bool(flag) + (summary.get("warnings") or [])]
    return agreement, warnings


def _benefit_and_cost(cfg, storage: Storage, records: dict[str, dict], expert: dict,
                      evaluation: dict, pass_rates: dict[str, float], candidate: str,
                      trained: list[str]) -> dict:
    try:
        pairs = len(training.read_canonical(cfg, storage, "preference"))
    except BadInput:
        pairs = None
    return cost.benefit_and_cost(cfg.cost, compute=records,
                                 expert_time=expert, evaluation=evaluation,
                                 pass_rates=pass_rates, preference_pairs=pairs,
                                 candidate=candidate, trained=trained, expert_label=EXPERT)


def _metric_part(name: str) -> str:
    """A reviewer's or model's name as a part of an MLflow metric name."""
    import re

    return re.sub(r"[^\w.\-]", "_", str(name))[:100] or "_"


def expert_time_metrics(expert: dict) -> dict[str, float]:
    """``panel/expert_seconds_*``: in all, per timed verdict, per model and per reviewer
    (none when no verdict carries a time: a simulated panel has no expert time)."""
    if not expert["timed"]:
        return {"expert_seconds_timed_verdicts": 0.0}
    out = {"expert_seconds_total": expert["seconds"],
           "expert_seconds_per_verdict": expert["mean_seconds"],
           "expert_seconds_timed_verdicts": float(expert["timed"])}
    for kind, part in (("model", expert["per_model"]), ("reviewer", expert["per_reviewer"])):
        for name, t in part.items():
            if t["timed"]:
                out[f"expert_seconds_{kind}/{_metric_part(name)}"] = t["seconds"]
    return out


def gate(cfg) -> dict:
    import mlflow

    storage = Storage.from_config(cfg)
    evaluation = _evaluation(cfg, storage)
    batch_id = evaluation["batch_id"]
    with PanelStore(panel_store_url(cfg)) as store:
        batch, progress = store.batch(batch_id), store.progress(batch_id)
        if batch.closed_at is None and not progress["complete"]:
            deadline = batch.deadline(timedelta(hours=cfg.panel.deadline_hours))
            if datetime.now(timezone.utc) < deadline:
                # a wait marked done by hand, or ended early: closing now would take the
                # batch from its reviewers
                raise BadInput(f"the panel has no quorum yet ({progress['items_complete']} of "
                               f"{progress['items']} items) and its deadline "
                               f"{deadline:%Y-%m-%d %H:%M} UTC has not passed: the batch "
                               "stays open",
                               field="panel.deadline_hours")
        # the decision is made on a closed batch: no verdict can arrive after it
        closed_at = store.close_batch(batch_id)
        batch = store.batch(batch_id)
        progress = store.progress(batch_id)
        rows = store.verdict_rows(batch_id)
        # a sequential panel: its state on the closed batch; closed by the deadline before
        # it decided, the deadline's look (only E >= 1/alpha promotes)
        state = store.sequential_state(batch_id)
        if state is not None and not state.decided:
            state = store.sequential_state(batch_id, final=True)
    k = batch.verdicts_per_item
    result = agg.aggregate(rows, k, curtailed=state is not None)
    reference = reference_model(evaluation["models"])
    candidates = cfg.candidates
    missing = [c.label for c in candidates if c.label not in evaluation["models"]]
    if missing:
        raise BadInput(f"the evaluation has no answers of {', '.join(missing)}: evaluate "
                       "this run's candidates first", file=cfg.step_uri("evaluate",
                                                                        "evaluate.json"))
    chosen, decisions = bake_off(result, GatePolicy.from_config(cfg.panel),
                                 [c.label for c in candidates], reference, sequential=state)
    report_only = batch.simulated and not cfg.panel.simulated_may_promote
    for d in decisions.values():
        if state is None and not progress["complete"]:
            d.promote = False
            d.reasons.insert(0, f"no quorum by the deadline: {progress['items_complete']} of "
                                f"{progress['items']} items have {k} verdicts")
        if report_only:
            d.promote = False
            d.reasons.append("the panel was simulated and the base config does not let a "
                             "simulated panel promote (panel.simulated_may_promote): this "
                             "is a report")
    decision = decisions[chosen]  # the one the run stands for
    outcome = "promote" if decision.promote else ("report" if report_only else "reject")
    sizes = _data_sizes(cfg, storage, candidates)
    # the champion that was evaluated, even if the alias has moved since
    champion = (registry.client(cfg).get_model_version(cfg.registry.model_name,
                                                       evaluation["champion_version"])
                if evaluation.get("champion_version") else None)
    if champion is not None:
        sizes["champion"] = f"version {champion.version}: {champion.tags.get('datasets', '')}"
    table = report.table_rows(result, sizes)
    simulated = batch.simulated
    out_uri = cfg.step_uri("gate")

    with tracking.step_run(cfg, "gate", tags={"panel.simulated": str(simulated).lower(),
                                              "panel.batch_id": batch_id}) as run_id, \
            tempfile.TemporaryDirectory(prefix="rlhf-gate-") as tmp:
        tmp = Path(tmp)
        metrics = {"kappa": result.kappa if result.kappa is not None else float("nan"),
                   "verdicts": result.verdicts, "reviewers": result.reviewers,
                   "items_decided": result.items_decided, "items": progress["items"],
                   "promote": float(decision.promote)}
        if decision.lift is not None:
            metrics.update(lift=decision.lift, p_value=decision.p_value,
                           discordant_candidate=decision.better,
                           discordant_reference=decision.worse)
        if len(candidates) > 1:  # every candidate's figures against the reference
            for label, d in decisions.items():
                figures_of = {"pass_rate": d.candidate_pass_rate, "lift": d.lift,
                              "p_value": d.p_value, "p_holm": d.p_adjusted,
                              "chosen": float(label == chosen)}
                metrics.update({f"bake_off/{label}/{key}": value
                                for key, value in figures_of.items() if value is not None})
        if state is not None:
            metrics.update({f"sequential/{key}": float(getattr(state, key)) for key in (
                "verdicts_used", "verdicts_fixed", "prompts_decided", "prompts")})
            metrics["sequential/e_value"] = min(state.e_value, 1e300)
        for m, s in result.scores.items():
            metrics.update({f"{m}/pass_rate": s.pass_rate, f"{m}/ci_low": s.ci_low,
                            f"{m}/ci_high": s.ci_high, f"{m}/items": s.items})
        with storage.local_copy(join(cfg.step_uri("evaluate"), "responses.jsonl")) as path:
            answers = [json.loads(line) for line in path.read_text("utf-8").splitlines()
                       if line.strip()]
        summaries = {c.label: _training_summary(storage, cfg, c) for c in candidates}
        agreement, warnings = _reward_checks(cfg, result, answers, evaluation, summaries)
        for m, (auc, n_pass, n_fail) in agreement.items():
            if auc is not None:
                metrics[f"reward_agreement/{m}"] = auc
        expert = agg.expert_time(rows)
        metrics.update(expert_time_metrics(expert))
        # each earlier step's wall time and devices, measured (rlhf_tasks/compute)
        records = compute.read_all(cfg, storage)
        figures = _benefit_and_cost(cfg, storage, records, expert, evaluation,
                                    {r["model"]: r["pass_rate"] for r in table}, chosen,
                                    [c.folder for c in candidates])
        tracking.log_metrics("cost", cost.metrics(figures))
        comparisons = paired_comparisons(result, chosen)
        for m, c in comparisons.items():
            metrics.update({f"vs_{m}/lift": c["lift"], f"vs_{m}/p_value": c["p_value"]})
        tracking.log_metrics("panel", metrics)
        png = report.plot(table, tmp / "pass_rates.png", simulated=simulated,
                          candidates=list(decisions))
        page = report.write_html(tmp / "report.html", rows=table, result=result,
                                 decision=decision.as_dict(), png=png, simulated=simulated,
                                 batch_id=batch_id, run=f"{cfg.run.pipeline}/{cfg.run.run_id}",
                                 agreement=agreement, warnings=warnings,
                                 expert_time=expert, cost_table=cost.text_table(figures))
        mlflow.log_artifact(str(png), artifact_path="panel")
        mlflow.log_artifact(str(page), artifact_path="panel")
        # every answer beside the panel's verdicts on it, readable in MLflow
        tracking.log_answers(answers, tracking.JUDGED_TABLE, verdicts=rows)

        # registered versions are MLflow models (MLmodel, signature, input example), linked
        # to the runs that trained them
        reward_info = storage.read_json(join(cfg.step_uri("reward", "model"), "reward_model.json"))
        reward_version = registry.register(
            cfg, storage, name=registry.reward_model_name(cfg),
            source=cfg.step_uri("reward", "served"), run_id=reward_info.get("mlflow_run_id"),
            tags={"airflow.dag_id": cfg.run.pipeline, "airflow.run_id": cfg.run.run_id,
                  "datasets": cfg.data.preference_uri, "base_model": cfg.model.base_model,
                  "heldout_accuracy": reward_info.get("heldout", {}).get("accuracy")})
        # every candidate becomes a version, tagged with its algorithm and figures; all but
        # the one promoted (if any) are rejected with their reasons
        versions = {}
        for c in candidates:
            d, scores = decisions[c.label], result.scores.get(c.label)
            tags = {
                "pass_rate": f"{scores.pass_rate:.4f}" if scores else None,
                "pass_rate_ci95": (f"[{scores.ci_low:.4f}, {scores.ci_high:.4f}]" if scores
                                   else None),
                "kappa": f"{result.kappa:.4f}" if result.kappa is not None else "undefined",
                "panel.simulated": str(simulated).lower(), "panel.batch_id": batch_id,
                "panel.verdicts": result.verdicts, "panel.reviewers": result.reviewers,
                "reference": reference, "lift": d.lift, "p_value": d.p_value,
                "p_value_holm": d.p_adjusted, "algorithm": c.algorithm,
                "candidate": c.label,
                "bake_off": ",".join(x.label for x in candidates) if len(candidates) > 1
                else None,
                "datasets": sizes.get(c.label, ""),
                "data.preference_uri": cfg.data.preference_uri,
                "data.prompt_uri": cfg.data.prompt_uri, "data.eval_uri": cfg.data.eval_uri,
                "airflow.dag_id": cfg.run.pipeline, "airflow.run_id": cfg.run.run_id,
                "base_model": cfg.model.base_model,
                "reward_model.version": reward_version.version,
                "base_model.revision": reward_info.get("base_model_revision"),
                "base_model.sha256": reward_info.get("base_model_sha256"),
                "adapter": cfg.step_uri(c.folder, "model"),
                "init_from": summaries[c.label].get("init_from", "foundation"),
                "gate.decision": ("promote" if d.promote else
                                  ("report" if report_only else "reject")),
                "panel.closed_at": closed_at.isoformat(),
            }
            versions[c.label] = registry.register(
                cfg, storage, name=cfg.registry.model_name,
                source=cfg.step_uri(c.folder, "served"),
                run_id=summaries[c.label].get("mlflow_run_id"), tags=tags,
                description=f"{c.algorithm.upper()} candidate of "
                            f"{cfg.run.pipeline}/{cfg.run.run_id}")
            if not d.promote:
                registry.reject(cfg, cfg.registry.model_name, versions[c.label].version,
                                d.summary, decision=tags["gate.decision"])
        version = versions[chosen]
        if cfg.tracking.panel_views:
            from rlhf_tasks.panel import mlflow_views

            model_ids = {label: v.model_id for label, v in versions.items()}
            if champion is not None and getattr(champion, "model_id", None):
                model_ids["champion"] = champion.model_id
            views = mlflow_views.publish(
                cfg, batch_id=batch_id, answers=answers, verdicts=rows, k=k,
                outcomes=result.outcomes, model_ids=model_ids,
                references={int(a["prompt_index"]): a["response"] for a in answers
                            if a["model"] == EXPERT})
        else:
            views = {}
        summary = {"decision": outcome, "champion_version": evaluation.get("champion_version"),
                   "closed_at": closed_at.isoformat(), "triggered_by": cfg.run.triggered_by,
                   "triggered_by_id": cfg.run.triggered_by_id,
                   "gate": decision.as_dict(), "table": table, "kappa": result.kappa,
                   "progress": progress, "simulated": simulated, "batch_id": batch_id,
                   "model_name": cfg.registry.model_name, "version": version.version,
                   "candidate": chosen,
                   "algorithm": next(c.algorithm for c in candidates if c.label == chosen),
                   "candidates": {c.label: {"algorithm": c.algorithm,
                                            "version": versions[c.label].version,
                                            "gate": decisions[c.label].as_dict()}
                                  for c in candidates},
                   "reward_model_name": registry.reward_model_name(cfg),
                   "reward_model_version": reward_version.version,
                   "needs_sign_off": bool(decision.promote and cfg.panel.approver),
                   "approver": cfg.panel.approver, "warnings": warnings,
                   "reward_agreement": {m: a[0] for m, a in agreement.items()},
                   "comparisons": comparisons, "evaluation_runs": views,
                   "expert_time": expert, "benefit_and_cost": figures,
                   "compute": records,
                   "mlflow_run_id": run_id}
        (tmp / "gate.json").write_text(json.dumps(summary, indent=2, default=str))
        storage.put_dir(tmp, out_uri, extra={"step": "gate"})
    log.info("gate: %s\n%s\n%s%s%s", outcome if report_only else decision.summary,
             report.text_table(table), cost.text_table(figures),
             "\n" + report.sequential_line(decision.sequential) if decision.sequential else "",
             "\n" + report.bake_off_table(decisions, chosen) if len(decisions) > 1 else "")
    return {"decision": summary["decision"], "reasons": decision.reasons,
            "version": version.version, "candidate": chosen,
            "versions": {label: v.version for label, v in versions.items()},
            "reward_model_version": reward_version.version,
            "needs_sign_off": summary["needs_sign_off"], "simulated": simulated,
            "pass_rates": {r["model"]: round(r["pass_rate"], 4) for r in table},
            "report_uri": join(out_uri, "report.html"), "warnings": warnings,
            "cost": cost.headline(figures),
            # links for people (mails, the sign-off): pages of the MLflow UI, never a path
            "report_url": tracking.artifact_url(cfg, run_id, "panel/report.html"),
            "mlflow_run_id": run_id}


SIGN_OFF_FILE = ("sign_off", "response.json")  # the answer, kept for the record only


def check_sign_off(cfg) -> str | None:
    """The approver who approved, when the run's config names one (``panel.approver``);
    BadInput unless this promote step was started by the sign-off task with Airflow's
    record of an Approve by that approver (``run.approved_by``, on the step's command
    line: no file, XCom or task state a user can change stands for an approval), who did
    not trigger the run."""
    approver = cfg.panel.approver
    if not approver:
        return None
    by = cfg.run.approved_by
    if by is None:
        raise BadInput(f"no approval by {approver!r}: with panel.approver set, only the "
                       "sign_off task promotes, after Airflow records the approver's Approve "
                       "(was this step started by hand, or the sign-off marked successful?)",
                       field="run.approved_by")
    if by != approver:
        raise BadInput(f"the approval came from {by!r}, not from the assigned approver "
                       f"{approver!r}", field="run.approved_by")
    if cfg.run.triggered_by and not cfg.run.triggered_by_id:
        raise BadInput(f"the id of {cfg.run.triggered_by!r}, who triggered this run, is "
                       "unknown: an approval cannot be told from a self-approval",
                       field="run.triggered_by_id")
    if by == cfg.run.triggered_by_id:
        raise BadInput(f"{by!r} triggered this run and cannot also sign it off",
                       field="run.approved_by")
    return by


def promote(cfg) -> dict:
    storage = Storage.from_config(cfg)
    uri = cfg.step_uri("gate", "gate.json")
    if not storage.exists(uri):
        raise BadInput("no gate decision for this run: run the gate step first", file=uri)
    decision = storage.read_json(uri)
    if decision["decision"] != "promote":
        raise BadInput(f"the gate decided {decision['decision']!r} for version "
                       f"{decision['version']}: nothing to promote", file=uri)
    if decision.get("simulated") and not cfg.panel.simulated_may_promote:
        raise BadInput("a simulated panel may not promote here "
                       "(panel.simulated_may_promote is off)", file=uri)
    approved_by = check_sign_off(cfg)
    name, version = decision["model_name"], decision["version"]
    aliases = registry.promote(cfg, name, version,
                               expected_champion=decision.get("champion_version"),
                               reward=(decision["reward_model_name"],
                                       decision["reward_model_version"]),
                               journal=(storage, cfg.step_uri("promote", "alias_moves.json")))
    if approved_by:
        registry.client(cfg).set_model_version_tag(name, version, "gate.signed_off_by",
                                                   approved_by)
    return {"model_name": name, "version": version, **aliases}
