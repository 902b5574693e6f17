"""The closed panel in MLflow's own GenAI views: Evaluation runs, Traces, Datasets.

The panel store stays the source of truth (blinding, the k-of-n quorum and the close are
ours); once the gate has closed a batch, this module copies what the panel decided into
the places an MLflow user looks:

* the eval set as an MLflow **evaluation dataset** (``mlflow.genai.datasets``): one record
  per prompt, its expert-written reference as the ``expected_response`` expectation.  The
  references are added here, after the close, never while the batch is open;
* per model, an **evaluation run** (``mlflow.genai.evaluate`` in answer-sheet mode:
  ``predict_fn=None``, one trace per answer), nested under the gate's run and tagged
  ``rlhf.panel.model``.  Its traces carry the tags ``rlhf.model``, ``rlhf.prompt_index`` and
  ``rlhf.batch_id``; two code scorers: ``reward`` (the reward model's score at evaluation)
  and ``panel_majority`` (the majority of the item's first k verdicts, the panel's outcome;
  none for an item without quorum), so the run's ``panel_majority/mean`` is the model's
  pass rate exactly as the gate counts it;
* every verdict as an assessment ``expert_pass`` on its answer's trace: source ``HUMAN``
  with the reviewer's name as ``source_id`` and the comment as rationale; simulated
  verdicts as ``CODE`` (``simulated:<rater>``) so they stay labelled for what they are.
  Verdicts past an item's first k are logged too, with ``counted: false`` in their
  metadata;
* the candidate's evaluation is linked to the LoggedModel of its registry version
  (``registry.register`` creates one per version).

Feedback entered in MLflow's UI after the close is not counted: the gate decided on the
store's closed batch, and nothing reads assessments back from MLflow.

Idempotent: a model's evaluation run is tagged ``rlhf.panel.view_complete`` once its
feedback is logged; a retried gate skips complete views and deletes a half-written one
(its run and traces) before writing it again.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict

from rlhf_tasks.panel.aggregate import verdicts_by_item

log = logging.getLogger(__name__)

MODEL_TAG = "rlhf.panel.model"
BATCH_TAG = "rlhf.panel.batch_id"
COMPLETE_TAG = "rlhf.panel.view_complete"
FEEDBACK = "expert_pass"
MAJORITY = "panel_majority"
REWARD = "reward"
MAJORITY_SOURCE = "rlhf.panel.majority"


def dataset_name(cfg) -> str:
    """One evaluation dataset per pipeline and eval file: records merge by their inputs,
    so a changed file adds its new prompts and updates references."""
    base = cfg.data.eval_uri.rstrip("/").rsplit("/", 1)[-1] or "eval"
    return f"{cfg.run.pipeline} eval {base}"


def _eval_dataset(cfg, experiment_id: str, records: list[dict]):
    from mlflow.genai import datasets

    name = dataset_name(cfg)
    found = datasets.search_datasets(experiment_ids=[experiment_id],
                                     filter_string=f"name = '{name}'", max_results=1)
    dataset = found[0] if found else datasets.create_dataset(
        name=name, experiment_id=experiment_id,
        tags={"rlhf.pipeline": cfg.run.pipeline, "source": cfg.data.eval_uri})
    dataset.merge_records(records)
    return dataset


def _records(answers: list[dict], references: dict[int, str]) -> list[dict]:
    prompts: dict[int, str] = {}
    for row in answers:
        prompts.setdefault(int(row["prompt_index"]), row["prompt"])
    records = []
    for index, prompt in sorted(prompts.items()):
        record: dict = {"inputs": {"prompt": prompt}}
        if references.get(index):
            record["expectations"] = {"expected_response": references[index]}
        records.append(record)
    return records


def _existing_views(experiment_id: str, batch_id: str) -> dict[str, object]:
    import mlflow

    runs = mlflow.MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.`{BATCH_TAG}` = '{batch_id}'", max_results=1000)
    return {r.data.tags[MODEL_TAG]: r for r in runs if MODEL_TAG in r.data.tags}


def _discard(run, experiment_id: str) -> None:
    """A view a killed gate left half-written: its traces and run go."""
    import mlflow

    client = mlflow.MlflowClient()
    traces = mlflow.search_traces(locations=[experiment_id], run_id=run.info.run_id,
                                  return_type="list")
    ids = [t.info.trace_id for t in traces]
    for start in range(0, len(ids), 100):
        client.delete_traces(experiment_id, trace_ids=ids[start:start + 100])
    client.delete_run(run.info.run_id)


def _source(verdict: dict):
    from mlflow.entities import AssessmentSource

    if verdict.get("source") == "simulated":
        return AssessmentSource(source_type="CODE", source_id=f"simulated:{verdict['reviewer']}")
    return AssessmentSource(source_type="HUMAN", source_id=str(verdict["reviewer"]))


def _scorers(rewards: dict[int, float], outcomes: dict[int, bool], votes: dict[int, list]):
    from mlflow.entities import AssessmentSource, Feedback
    from mlflow.genai.scorers import scorer

    @scorer(name=REWARD)
    def reward(inputs):
        return rewards.get(int(inputs["prompt_index"]))

    @scorer(name=MAJORITY)
    def panel_majority(inputs):
        index = int(inputs["prompt_index"])
        if index not in outcomes:
            return None  # no quorum on this answer: the gate leaves it out, and so do we
        passes = sum(votes[index])
        return Feedback(value=outcomes[index],
                        source=AssessmentSource(source_type="CODE", source_id=MAJORITY_SOURCE),
                        rationale=f"{passes} of {len(votes[index])} verdicts passed")

    return [reward, panel_majority]


def publish(cfg, *, batch_id: str, answers: list[dict], verdicts: list[dict], k: int,
            outcomes: dict[str, dict[int, bool]], references: dict[int, str],
            model_ids: dict[str, str] | None = None) -> dict[str, str]:
    """Write the views (see the module); returns model -> its evaluation run id.  Call
    inside the gate's MLflow run: the evaluation runs nest under it."""
    import mlflow

    from rlhf_tasks import tracking

    # traces must be in the store before feedback is logged on them; a SQLite store
    # takes one writer at a time (more threads only queue on its connection pool)
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "false")
    if tracking.resolve_uri(cfg.tracking.tracking_uri).startswith("sqlite:"):
        os.environ.setdefault("MLFLOW_GENAI_EVAL_MAX_WORKERS", "1")
        os.environ.setdefault("MLFLOW_GENAI_EVAL_MAX_SCORER_WORKERS", "1")
    experiment_id = tracking.setup(cfg)
    dataset = _eval_dataset(cfg, experiment_id, _records(answers, references))
    existing = _existing_views(experiment_id, batch_id)

    first_k: dict[tuple[str, int], list[bool]] = {}
    counted: set[int] = set()
    for item in verdicts_by_item(verdicts).values():
        first_k[(item[0]["model"], int(item[0]["prompt_index"]))] = [
            bool(v["passed"]) for v in item[:k]]
        counted.update(v["id"] for v in item[:k])
    by_model: dict[str, list[dict]] = defaultdict(list)
    for row in answers:
        by_model[row["model"]].append(row)

    runs: dict[str, str] = {}
    for model, rows in sorted(by_model.items()):
        previous = existing.get(model)
        if previous is not None and previous.data.tags.get(COMPLETE_TAG) == "true":
            runs[model] = previous.info.run_id
            continue
        if previous is not None:
            _discard(previous, experiment_id)
        rewards = {int(r["prompt_index"]): float(r["reward"]) for r in rows
                   if r.get("reward") is not None}
        votes = {i: first_k[(model, i)] for i in outcomes.get(model, {})}
        data = [{"inputs": {"prompt": r["prompt"], "prompt_index": int(r["prompt_index"])},
                 "outputs": r["response"],
                 "tags": {"rlhf.model": model, "rlhf.prompt_index": str(r["prompt_index"]),
                          "rlhf.batch_id": batch_id}}
                for r in sorted(rows, key=lambda r: int(r["prompt_index"]))]
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"panel: {model}",
                              nested=True,
                              tags={MODEL_TAG: model, BATCH_TAG: batch_id,
                                    tracking.PIPELINE_TAG: cfg.run.pipeline,
                                    tracking.RUN_TAG: cfg.run.run_id}) as run:
            mlflow.log_input(dataset, context="eval")
            result = mlflow.genai.evaluate(
                data=data, scorers=_scorers(rewards, outcomes.get(model, {}), votes),
                model_id=(model_ids or {}).get(model))
            traces = {int(t.info.tags.get("rlhf.prompt_index", -1)): t.info.trace_id
                      for t in mlflow.search_traces(locations=[experiment_id],
                                                    run_id=run.info.run_id,
                                                    include_spans=False, return_type="list")}
            for v in verdicts:
                if v["model"] != model:
                    continue
                mlflow.log_feedback(
                    trace_id=traces[int(v["prompt_index"])], name=FEEDBACK,
                    value=bool(v["passed"]), source=_source(v),
                    rationale=v.get("comment") or None,
                    metadata={"batch_id": batch_id, "verdict_id": str(v["id"]),
                              "counted": str(v["id"] in counted).lower(),
                              "seconds": "" if v.get("seconds") is None else str(v["seconds"]),
                              "given_at": str(v.get("created_at") or "")})
            decided = outcomes.get(model, {})
            if decided:
                mlflow.log_metric("expert_pass_rate", sum(decided.values()) / len(decided))
            mlflow.log_metric("items_decided", len(decided))
            mlflow.set_tag(COMPLETE_TAG, "true")
            runs[model] = run.info.run_id
            log.info("panel view of %s: %d answers, %d scorer metrics", model, len(data),
                     len(result.metrics))
    return runs
