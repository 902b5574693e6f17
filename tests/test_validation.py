"""Every validation rule, with a failing and a passing case; the step end to end."""

import json

import pytest

from rlhf_tasks.data import validation
from rlhf_tasks.errors import BadInput
from rlhf_tasks.storage import Storage
from tests.conftest import write_jsonl

GOOD = {"prompt": "worked on the help desk", "chosen": "Led help desk, cutting delays by 20%",
        "rejected": "Helped with the help desk"}


def run(tmp_path, tokenizer, rows, kind="preference", eval_keys=None, fmt="auto", **data):
    from rlhf_tasks import config

    cfg = config.validate({"data": {"min_preference_rows": 1, "min_prompt_rows": 1,
                                    "min_eval_rows": 1, "min_sft_rows": 1, **data}})
    path = rows if not isinstance(rows, list) else write_jsonl(tmp_path / "d.jsonl", rows)
    storage = Storage(str(tmp_path / "art"), [str(tmp_path)])
    return validation.validate_dataset(storage=storage, uri=str(path), kind=kind, fmt=fmt,
                                       load_tokenizer=lambda: tokenizer, data_cfg=cfg.data,
                                       eval_keys=eval_keys, docs_dir=tmp_path / "docs")


def reasons(outcome):
    return {(q["line"], r) for q in outcome.quarantine for r in q["reasons"]}


def test_clean_data_keeps_every_row(tmp_path, tokenizer):
    out = run(tmp_path, tokenizer, [GOOD, {**GOOD, "prompt": "helped with payroll"}])
    assert out.rows_read == 2 and out.rows_kept == 2 and out.quarantine == []
    assert list(out.frame.columns) == ["prompt", "chosen", "rejected", "margin", "messages",
                                      "source_line"]
    assert (tmp_path / "docs" / "index.html").exists()


def test_empty_strings(tmp_path, tokenizer):
    out = run(tmp_path, tokenizer, [GOOD, {**GOOD, "prompt": "  "}, {**GOOD, "rejected": ""}])
    assert reasons(out) == {(2, "empty prompt"), (3, "empty rejected")}
    assert out.rows_kept == 1


def test_chosen_equals_rejected(tmp_path, tokenizer):
    out = run(tmp_path, tokenizer, [GOOD, {**GOOD, "prompt": "p2", "rejected": GOOD["chosen"] + " "}])
    assert reasons(out) == {(2, "chosen equals rejected")}


def test_duplicates_keep_the_first(tmp_path, tokenizer):
    out = run(tmp_path, tokenizer, [GOOD, {**GOOD, "prompt": "other"}, dict(GOOD)])
    assert reasons(out) == {(3, "duplicate row (first seen on line 1)")}
    assert out.frame["source_line"].tolist() == [1, 2]


def test_same_prompt_different_answers_is_not_a_duplicate(tmp_path, tokenizer):
    out = run(tmp_path, tokenizer, [GOOD, {**GOOD, "rejected": "Worked on the help desk"}])
    assert out.quarantine == []


def test_leakage_against_eval_set(tmp_path, tokenizer):
    keys = {validation.prompt_key("Worked on  the HELP desk")}
    out = run(tmp_path, tokenizer, [GOOD, {**GOOD, "prompt": "other"}], eval_keys=keys)
    assert reasons(out) == {(1, "prompt also in the eval set (leakage)")}


def test_token_length_bounds(tmp_path, tokenizer):
    long_answer = "Led " + "help desk " * 30
    out = run(tmp_path, tokenizer, [GOOD, {**GOOD, "chosen": long_answer},
                                    {**GOOD, "prompt": "x " * 80}], max_target_tokens=20,
              max_prompt_tokens=40)
    assert reasons(out) == {(2, "chosen longer than 20 tokens"), (3, "prompt longer than 40 tokens")}


def test_vertex_choice_rule(tmp_path, tokenizer):
    rows = [{"input_text": "q", "candidate_0": "a", "candidate_1": "b", "choice": 0},
            {"input_text": "q2", "candidate_0": "a", "candidate_1": "b", "choice": "yes"}]
    out = run(tmp_path, tokenizer, rows)
    assert out.fmt == "vertex"
    assert reasons(out) == {(2, "expected 0 or 1, got 'yes'")}
    assert out.quarantine[0]["field"] == "choice"


def test_min_rows_and_bad_fraction(tmp_path, tokenizer):
    out = run(tmp_path, tokenizer, [GOOD, {**GOOD, "prompt": ""}], min_preference_rows=2)
    with pytest.raises(BadInput) as err:
        validation.check_outcome(out, max_bad_fraction=0.0)
    message = str(err.value)
    assert "1 of 2 rows are bad" in message and "line 2" in message and "field 'prompt'" in message
    with pytest.raises(BadInput, match="too few rows: 1 rows kept, at least 2"):
        validation.check_outcome(out, max_bad_fraction=0.5)
    ok = run(tmp_path, tokenizer, [GOOD, {**GOOD, "prompt": "p2"}], min_preference_rows=2)
    validation.check_outcome(ok, max_bad_fraction=0.0)


def test_eval_set_rules(tmp_path, tokenizer):
    out = run(tmp_path, tokenizer, [{"prompt": "a"}, {"prompt": "A "}, {"prompt": ""}], kind="eval")
    assert reasons(out) == {(2, "duplicate row (first seen on line 1)"), (3, "empty prompt")}


def test_demo_preferences_quarantine_exactly_the_planted_rows(demo_dir, tokenizer, tmp_path):
    storage = Storage(str(tmp_path / "art"), [str(demo_dir)])
    keys = validation.read_prompt_keys(storage, str(demo_dir / "eval.jsonl"), 100)
    from rlhf_tasks import config

    cfg = config.load(str(demo_dir / "demo.yaml"))
    out = validation.validate_dataset(storage=storage, uri=str(demo_dir / "preferences.jsonl"),
                                      kind="preference", fmt="auto", load_tokenizer=lambda: tokenizer,
                                      data_cfg=cfg.data, eval_keys=keys, docs_dir=tmp_path / "d")
    by_reason = out.reasons()
    assert by_reason == {"duplicate row": 3, "chosen equals rejected": 2,
                         "prompt also in the eval set": 2, "missing field": 1, "empty prompt": 1,
                         "invalid JSON": 1}
    assert out.rows_read == 4010 and out.rows_kept == 4000
    validation.check_outcome(out, cfg.data.max_bad_fraction)


def test_ranked_demo_file(demo_dir, tokenizer, tmp_path):
    storage = Storage(str(tmp_path / "art"), [str(demo_dir)])
    from rlhf_tasks import config

    cfg = config.load(str(demo_dir / "demo.yaml"))
    out = validation.validate_dataset(storage=storage, uri=str(demo_dir / "preferences_ranked.jsonl"),
                                      kind="preference", fmt="ranked", load_tokenizer=lambda: tokenizer,
                                      data_cfg=cfg.data, eval_keys=None, docs_dir=tmp_path / "d")
    assert out.fmt == "ranked" and out.quarantine == [] and out.rows_kept >= 300 * 5


def test_validate_step_writes_artifacts_and_mlflow(make_config, demo_dir):
    import mlflow

    from rlhf_tasks.steps.validate import validate_kind

    cfg = make_config(data={"eval_uri": str(demo_dir / "eval.jsonl"), "max_bad_fraction": 0.01,
                            "preference_uri": str(demo_dir / "preferences.jsonl")})
    result = validate_kind(cfg, "preference")
    assert result["rows_kept"] == 4000 and result["rows_quarantined"] == 10
    step_dir = cfg.step_uri("validate_preference")
    manifest = json.load(open(step_dir + "/MANIFEST.json"))
    assert manifest["status"] == "ok"
    assert {"canonical.parquet", "quarantine.jsonl", "report.json", "data_docs/index.html"} <= set(manifest["files"])
    run = mlflow.MlflowClient().get_run(result["mlflow_run_id"])
    assert run.data.metrics["data/preference/rows_kept"] == 4000
    assert run.data.tags["mlflow.parentRunId"]
    assert run.inputs.dataset_inputs[0].dataset.digest == result["digest"][:36]


def test_validate_step_rejects_and_writes_no_canonical(make_config, tmp_path):
    from rlhf_tasks.steps.validate import validate_kind

    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, {**GOOD, "prompt": ""}])
    cfg = make_config(data={"preference_uri": str(path)})
    with pytest.raises(BadInput, match="1 of 2 rows are bad"):
        validate_kind(cfg, "preference")
    step_dir = cfg.step_uri("validate_preference")
    manifest = json.load(open(step_dir + "/MANIFEST.json"))
    assert manifest["status"] == "rejected" and "canonical.parquet" not in manifest["files"]
    assert json.loads(open(step_dir + "/quarantine.jsonl").readline())["line"] == 2


def test_sft_kind_quarantines_empty_long_and_leaked_rows(tmp_path, tokenizer):
    rows = [{"prompt": "led the team", "completion": "Led a team of 5"},
            {"prompt": "ran the budget", "completion": ""},
            {"prompt": "wrote reports", "completion": "word " * 40},
            {"prompt": "held out", "completion": "x"},
            {"messages": [{"role": "user", "content": "fixed bugs"},
                          {"role": "assistant", "content": "Fixed 20 bugs"}]}]
    out = run(tmp_path, tokenizer, rows[:4], kind="sft", eval_keys={"held out"},
              max_target_tokens=20)
    assert out.fmt == "completion"
    assert reasons(out) == {(2, "empty completion"), (3, "completion longer than 20 tokens"),
                            (4, "prompt also in the eval set (leakage)")}
    assert out.frame.columns.tolist() == ["prompt", "completion", "messages", "source_line"]
    chat = run(tmp_path, tokenizer, rows[4:], kind="sft")
    assert chat.frame.iloc[0][["prompt", "completion"]].tolist() == ["fixed bugs", "Fixed 20 bugs"]
