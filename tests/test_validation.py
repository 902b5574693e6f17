"""Every validation rule, with a failing and a passing case; the step end to end."""

import json
import re

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
    # the Data Docs and the suites (GX JSON) are linked from the run and stored with it
    assert run.data.tags["data_docs"].endswith("validate_preference/data_docs/index.html")
    assert "Data Docs" in run.data.tags["mlflow.note.content"]
    assert {"expectations/preference-rows.json", "expectations/preference-table.json",
            "data_docs/static/vendor/jquery/dist/jquery.min.js"} <= set(manifest["files"])


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


def _team_suites(folder, kind, suite):
    (folder / kind).mkdir(parents=True, exist_ok=True)
    (folder / kind / "team.json").write_text(json.dumps(suite))
    return str(folder)


def test_a_data_teams_suites_quarantine_rows_and_fail_tables(tmp_path, tokenizer):
    """``data.expectations_dir``: the team's row expectation quarantines by its name; its
    table expectation fails the table, named; every suite that ran is written as GX JSON."""
    import great_expectations as gx

    rows = [{"prompt": "worked on the help desk"}, {"prompt": "x" * 45},
            {"prompt": "helped with payroll"}]
    suites = _team_suites(tmp_path / "team", "prompt", {"name": "hr", "expectations": [
        {"type": "expect_column_value_lengths_to_be_between",
         "kwargs": {"column": "prompt", "max_value": 40},
         "meta": {"reason": "prompt over 40 characters"}},
        {"type": "expect_column_values_to_match_regex",
         "kwargs": {"column": "prompt", "regex": "^[a-z]"}}]})
    out = run(tmp_path, tokenizer, rows, kind="prompt", expectations_dir=suites)
    assert reasons(out) == {(2, "prompt over 40 characters")}
    assert out.quarantine[0]["field"] == "prompt" and out.rows_kept == 2
    validation.check_outcome(out, 0.5)  # the rows rule quarantines; the table is fine
    written = sorted(p.name for p in (tmp_path / "expectations").iterdir())
    assert written == ["prompt-rows.json", "prompt-table.json", "team-prompt-hr.json"]
    for path in (tmp_path / "expectations").iterdir():  # GX reads its own format back
        suite = json.loads(path.read_text())
        assert gx.ExpectationSuite(name=suite["name"], expectations=[
            gx.expectations.ExpectColumnValuesToNotBeNull(column="prompt")]).name

    # a table expectation: too many rows for the team's taste fails the table, named
    suites = _team_suites(tmp_path / "team2", "prompt", {"expectations": [
        {"type": "expect_table_row_count_to_be_between", "kwargs": {"max_value": 1}}]})
    out = run(tmp_path, tokenizer, rows, kind="prompt", expectations_dir=suites)
    assert out.quarantine == [] and out.table_failures == [
        "team-prompt-team: expect_table_row_count_to_be_between (observed 3)"]
    with pytest.raises(BadInput, match="failed table expectations: team-prompt-team: "
                                       "expect_table_row_count_to_be_between"):
        validation.check_outcome(out, 1.0)


@pytest.mark.parametrize("text, where", [
    ("{not json", r"not a GX suite \(JSON\)"),
    ('{"expectations": {}}', "field 'expectations'"),
    ('{"expectations": [{"kwargs": {}}]}', r"field 'expectations\[0\]'"),
    ('{"expectations": [{"type": "expect_the_moon", "kwargs": {}}]}',
     r"field 'expectations\[0\]'.*expect_the_moon"),
    ('{"expectations": [{"type": "expect_column_values_to_be_between", '
     '"kwargs": {"column": "prompt", "min_value": "a", "max_value": 1, "mostly": 7}}]}',
     r"field 'expectations\[0\]'"),
])
def test_a_broken_team_suite_is_named(tmp_path, tokenizer, text, where):
    (tmp_path / "team" / "prompt").mkdir(parents=True)
    (tmp_path / "team" / "prompt" / "bad.json").write_text(text)
    with pytest.raises(BadInput, match=f"bad.json.*{where}"):
        run(tmp_path, tokenizer, [{"prompt": "p"}], kind="prompt",
            expectations_dir=str(tmp_path / "team"))


def test_data_docs_load_nothing_from_the_network(tmp_path, tokenizer):
    from rlhf_tasks.data.expectations import EXTERNAL_LOAD

    run(tmp_path, tokenizer, [GOOD, {**GOOD, "prompt": "  "}])
    pages = list((tmp_path / "docs").rglob("*.html"))
    assert len(pages) >= 3
    for page in pages:
        text = page.read_text()
        assert not [m.group(0) for m in EXTERNAL_LOAD.finditer(text)
                    if m.group(1) or "stylesheet" in m.group(0)], page
        for ref in re.findall(r'(?:src|href)="([^"#]*static/vendor/[^"]+)"', text):
            assert (page.parent / ref).resolve().is_file(), (page, ref)
