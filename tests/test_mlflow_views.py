"""The closed panel in MLflow's GenAI views (panel/mlflow_views.py), on a real MLflow
SQLite store: the answers as traces with every verdict as HUMAN feedback, an evaluation run
per model whose pass rate is the gate's, the eval set as an evaluation dataset, the
candidate's evaluation linked to its registry version's LoggedModel, and a retried gate
that neither duplicates a finished view nor keeps a half-written one."""

from __future__ import annotations

import pytest

from rlhf_tasks import config, registry, tracking
from rlhf_tasks.panel import aggregate as agg
from rlhf_tasks.panel import mlflow_views
from rlhf_tasks.panel.store import PanelStore

MODELS = ("rlhf", "foundation", "reference")
PROMPTS = 4


def _judge(model: str, index: int, reviewer: str) -> bool:
    """A fixed panel: rlhf passes 3 of 4 prompts, foundation 1 of 4 (cara dissents once),
    the experts' references all."""
    if model == "reference":
        return True
    if model == "rlhf":
        return index != 3
    return index == 0 or (reviewer == "cara" and index == 1)


@pytest.fixture()
def closed_panel(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = PanelStore(f"sqlite:///{tmp_path}/panel.db")
    answers = [{"prompt_index": i, "prompt": f"Rewrite bullet {i}", "model": m,
                "response": f"{m} answer {i}", "reward": 0.5 * i - (m == "foundation"),
                "ended": True} for i in range(PROMPTS) for m in MODELS]
    batch = store.create_batch(pipeline="pipe", run_id="r1", items=answers,
                               verdicts_per_item=3, quality_bar="Be good.", simulated=False)
    for reviewer in ("ann", "bob", "cara", "dan"):
        while (item := store.next_item(batch, reviewer)) is not None:
            row = next(r for r in store.items(batch, with_model=True) if r["id"] == item.id)
            passed = _judge(row["model"], row["prompt_index"], reviewer)
            store.record_verdict(item.id, reviewer, passed,
                                 comment="" if passed else f"{reviewer}: invented figure")
    store.close_batch(batch)
    verdicts = store.verdict_rows(batch)
    store.dispose()
    cfg = config.PipelineConfig.model_validate({
        "run": {"pipeline": "pipe", "run_id": "r1"},
        "data": {"eval_uri": str(tmp_path / "eval.jsonl")},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}})
    return cfg, batch, answers, verdicts


def _publish(cfg, batch, answers, verdicts, model_ids=None):
    result = agg.aggregate(verdicts, 3)
    with tracking.step_run(cfg, "gate"):
        runs = mlflow_views.publish(
            cfg, batch_id=batch, answers=answers, verdicts=verdicts, k=3,
            outcomes=result.outcomes, model_ids=model_ids,
            references={a["prompt_index"]: a["response"] for a in answers
                        if a["model"] == "reference"})
    return result, runs


def test_the_closed_panel_in_mlflows_evaluation_views(closed_panel):
    import mlflow
    from mlflow.genai import datasets

    cfg, batch, answers, verdicts = closed_panel
    where = [tracking.setup(cfg)]
    version = registry.logged_model(cfg, name="cand", source="/models/cand", run_id=None,
                                    tags={"a": "b"})
    result, runs = _publish(cfg, batch, answers, verdicts, model_ids={"rlhf": version.model_id})
    assert set(runs) == set(MODELS)
    client = mlflow.MlflowClient()
    # every model's pass rate in its evaluation run is the gate's (the majority of the
    # first k verdicts, over the items with quorum): rlhf 3/4, foundation 1/4, reference 1
    assert {m: s.pass_rate for m, s in result.scores.items()} == {
        "rlhf": 0.75, "foundation": 0.25, "reference": 1.0}
    for model, run_id in runs.items():
        run = client.get_run(run_id)
        assert run.data.metrics["panel_majority/mean"] == pytest.approx(
            result.scores[model].pass_rate)
        assert run.data.metrics["expert_pass_rate"] == pytest.approx(
            result.scores[model].pass_rate)
        assert run.data.tags["mlflow.runType"] == "genai_evaluate"
        assert run.data.tags[mlflow_views.COMPLETE_TAG] == "true"

    # the answers as traces, tagged, with each verdict as HUMAN feedback from its reviewer
    traces = mlflow.search_traces(locations=where, run_id=runs["foundation"],
                                  return_type="list")
    assert len(traces) == PROMPTS
    by_index = {int(t.info.tags["rlhf.prompt_index"]): t for t in traces}
    second = by_index[1]
    assert second.info.tags["rlhf.model"] == "foundation"
    assert second.info.tags["rlhf.batch_id"] == batch
    human = [a for a in second.info.assessments if a.name == "expert_pass"]
    assert sorted((a.source.source_id, a.value) for a in human) == [
        ("ann", False), ("bob", False), ("cara", True)]
    assert all(a.source.source_type == "HUMAN" for a in human)
    assert {a.rationale for a in human if not a.value} == {
        "ann: invented figure", "bob: invented figure"}
    majority = [a for a in second.info.assessments if a.name == "panel_majority"]
    assert [(a.value, a.source.source_type, a.rationale) for a in majority] == [
        (False, "CODE", "1 of 3 verdicts passed")]
    rewards = [a.value for a in second.info.assessments if a.name == "reward"]
    assert rewards == [pytest.approx(-0.5)]
    # dan judged nothing (each item had its 3 verdicts): 36 verdicts, 36 assessments
    all_human = [a for m in MODELS
                 for t in mlflow.search_traces(locations=where, run_id=runs[m],
                                               return_type="list")
                 for a in t.info.assessments if a.name == "expert_pass"]
    assert len(all_human) == len(verdicts) == 3 * PROMPTS * len(MODELS)

    # the README's query: one model's answers by their tag
    assert len(mlflow.search_traces(locations=where, return_type="list",
                                    filter_string="tags.`rlhf.model` = 'rlhf'")) == PROMPTS
    # the candidate's evaluation is linked to its LoggedModel
    assert mlflow.search_traces(locations=where, model_id=version.model_id,
                                return_type="list")
    # the eval set, with the experts' references as expectations
    found = datasets.search_datasets(experiment_ids=where, filter_string=f"name = '{mlflow_views.dataset_name(cfg)}'")
    assert len(found) == 1
    records = found[0].to_df()
    assert len(records) == PROMPTS
    assert sorted(e["expected_response"] for e in records["expectations"]) == [
        f"reference answer {i}" for i in range(PROMPTS)]


def test_a_retried_gate_keeps_finished_views_and_rewrites_a_half_written_one(closed_panel):
    import mlflow

    cfg, batch, answers, verdicts = closed_panel
    _, first = _publish(cfg, batch, answers, verdicts)
    client = mlflow.MlflowClient()
    # a gate killed while writing the foundation view: its run lacks the completion tag
    client.delete_tag(first["foundation"], mlflow_views.COMPLETE_TAG)
    _, second = _publish(cfg, batch, answers, verdicts)
    assert second["rlhf"] == first["rlhf"] and second["reference"] == first["reference"]
    assert second["foundation"] != first["foundation"]
    assert client.get_run(first["foundation"]).info.lifecycle_stage == "deleted"
    experiment = tracking.setup(cfg)
    traces = mlflow.search_traces(locations=[experiment], return_type="list")
    assert len(traces) == PROMPTS * len(MODELS)  # no answer twice


def test_simulated_verdicts_stay_labelled_as_code():
    from rlhf_tasks.panel.mlflow_views import _source

    assert (_source({"reviewer": "strict", "source": "simulated"}).source_type,
            _source({"reviewer": "strict", "source": "simulated"}).source_id) == (
        "CODE", "simulated:strict")
    assert _source({"reviewer": "ann", "source": "web"}).source_type == "HUMAN"
    assert _source({"reviewer": "ann", "source": "import"}).source_type == "HUMAN"
