"""Each input format, each reader, and a property test of the JSONL parser."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_tasks.data import formats
from rlhf_tasks.errors import BadInput
from tests.conftest import write_jsonl


def rows_of(path, kind="preference", fmt=None):
    records = list(formats.read_records(path, str(path)))
    fmt = fmt or formats.detect_format(formats.records_fields(records), kind, str(path))
    return fmt, [formats.normalise(r, kind, fmt) for r in records]


def test_pairs_with_margin(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": " q ", "chosen": "a", "rejected": "b", "margin": 2}])
    fmt, out = rows_of(p)
    assert fmt == "pairs"
    assert out == [[{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 2.0,
                     "messages": None}]]


def test_ranked_expands_every_ordered_pair(tmp_path):
    p = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "q", "responses": ["best", "mid", "worst"]}])
    fmt, out = rows_of(p)
    assert fmt == "ranked"
    pairs = [(r["chosen"], r["rejected"]) for r in out[0]]
    assert pairs == [("best", "mid"), ("best", "worst"), ("mid", "worst")]


def test_ranked_with_ranks_and_ties(tmp_path):
    p = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "q", "responses": ["a", "b", "c", "d"],
                                            "ranks": [3, 1, 3, 2]}])
    _, out = rows_of(p)
    pairs = {(r["chosen"], r["rejected"]) for r in out[0]}
    # b(1) > d(2) > a(3) = c(3): 5 pairs, none between the tied a and c
    assert pairs == {("b", "d"), ("b", "a"), ("b", "c"), ("d", "a"), ("d", "c")}


def test_vertex_choice_picks_chosen(tmp_path):
    p = write_jsonl(tmp_path / "v.jsonl", [
        {"input_text": "q", "candidate_0": "x", "candidate_1": "y", "choice": 1},
        {"input_text": "q2", "candidate_0": "x", "candidate_1": "y", "choice": 0},
        {"input_text": "q3", "candidate_0": "x", "candidate_1": "y", "choice": 2}])
    fmt, out = rows_of(p)
    assert fmt == "vertex"
    assert out[0][0]["chosen"] == "y" and out[0][0]["rejected"] == "x"
    assert out[1][0]["chosen"] == "x"
    assert isinstance(out[2], formats.RowProblem) and out[2].field == "choice"
    assert "expected 0 or 1" in out[2].reason


def test_chat_pairs_explicit_and_implicit_prompt(tmp_path):
    user = {"role": "user", "content": "fix my bullet"}
    p = write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "good"}],
         "rejected": [{"role": "assistant", "content": "bad"}]},
        {"chosen": [user, {"role": "assistant", "content": "good"}],
         "rejected": [user, {"role": "assistant", "content": "bad"}]}])
    _, out = rows_of(p)
    for rows in out:
        assert rows == [{"prompt": "fix my bullet", "chosen": "good", "rejected": "bad",
                         "margin": None, "messages": json.dumps([user])}]


def test_chat_prompt_dataset_multi_turn(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [{"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}])
    fmt, out = rows_of(p, kind="prompt")
    assert fmt == "chat"
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    # the text people read, and every turn kept for the chat template
    assert out[0] == [{"prompt": "system: be brief\nuser: hi", "messages": json.dumps(turns)}]


def test_chat_sft_keeps_every_turn_before_the_answer(tmp_path):
    turns = [{"role": "user", "content": "draft a bullet"}, {"role": "assistant", "content": "ok?"},
             {"role": "user", "content": "shorter"}]
    p = write_jsonl(tmp_path / "s.jsonl", [{"messages": turns + [
        {"role": "assistant", "content": "Cut costs 10%"}]}])
    fmt, out = rows_of(p, kind="sft")
    assert fmt == "chat"
    assert json.loads(out[0][0]["messages"]) == turns
    assert out[0][0]["completion"] == "Cut costs 10%"


def test_prompt_and_input_text(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "x"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"input_text": "y"}])
    assert rows_of(a, "prompt") == ("prompt", [[{"prompt": "x", "messages": None}]])
    assert rows_of(a, "eval") == ("prompt", [[{"prompt": "x", "messages": None,
                                              "reference": None, "reference_minutes": None}]])
    assert rows_of(b, "eval") == ("input_text", [[{"prompt": "y", "messages": None,
                                                   "reference": None,
                                                   "reference_minutes": None}]])


def test_eval_rows_may_carry_an_expert_reference(tmp_path):
    from rlhf_tasks.data.formats import MAX_REFERENCE_CHARS, RowProblem

    path = write_jsonl(tmp_path / "e.jsonl", [
        {"prompt": "x", "reference": "  Cut costs 10%  "}, {"prompt": "y", "reference": ""},
        {"prompt": "z", "reference": 5}, {"prompt": "w", "reference": "a" * (MAX_REFERENCE_CHARS + 1)}])
    fmt, rows = rows_of(path, "eval")
    assert rows[0] == [{"prompt": "x", "messages": None, "reference": "Cut costs 10%",
                        "reference_minutes": None}]
    assert rows[1][0]["reference"] is None
    assert isinstance(rows[2], RowProblem) and rows[2].field == "reference"
    assert "expected a string, got int" in rows[2].reason
    assert isinstance(rows[3], RowProblem) and "longer than" in rows[3].reason


def test_eval_rows_may_say_how_long_the_reference_took(tmp_path):
    """``reference_minutes``: the cost of an answer written by hand, measured in the data;
    a bad value, or one without a reference, is the row's problem, naming the field."""
    from rlhf_tasks.data.formats import RowProblem

    path = write_jsonl(tmp_path / "m.jsonl", [
        {"prompt": "a", "reference": "Cut costs 10%", "reference_minutes": 3.5},
        {"prompt": "b", "reference": "Led 4 staff", "reference_minutes": "7"},
        {"prompt": "c", "reference": "Won 2 bids", "reference_minutes": -1},
        {"prompt": "d", "reference": "Won 2 bids", "reference_minutes": "soon"},
        {"prompt": "e", "reference_minutes": 4},
        {"prompt": "f", "reference": "Ran payroll", "reference_minutes": True}])
    _, rows = rows_of(path, "eval")
    assert rows[0][0]["reference_minutes"] == 3.5 and rows[1][0]["reference_minutes"] == 7.0
    for row, reason in zip(rows[2:], ("not between 0 and 1440", "expected a number",
                                      "given without a reference", "expected a number")):
        assert isinstance(row, RowProblem) and row.field == "reference_minutes", row
        assert reason in row.reason


def test_csv_with_json_cells_and_line_numbers(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text('prompt,responses\nq,"[""a"", ""b""]"\n"multi\nline",x\n', encoding="utf-8")
    records = list(formats.read_records(p, str(p)))
    assert [r.line for r in records] == [2, 3]
    assert records[0].data["responses"] == ["a", "b"]


def test_parquet_reader(tmp_path):
    import pandas as pd

    p = tmp_path / "d.parquet"
    pd.DataFrame({"prompt": ["a", "b"], "chosen": ["c", "d"], "rejected": ["e", "f"]}).to_parquet(p)
    fmt, out = rows_of(p)
    assert fmt == "pairs" and len(out) == 2


def test_misspelled_column_gets_a_hint(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "q", "choosen": "a", "rejected": "b"}])
    with pytest.raises(BadInput) as err:
        rows_of(p)
    assert "'choosen' looks like a misspelling of 'chosen'" in str(err.value)
    assert "m.jsonl" in str(err.value)


def test_wrong_types_are_row_problems(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"prompt": 3, "chosen": "a", "rejected": "b"},
                                           {"prompt": "q", "chosen": "a", "rejected": "b", "margin": "x"}])
    _, out = rows_of(p)
    assert out[0].field == "prompt" and "expected a string, got int" in out[0].reason
    assert out[1].field == "margin"


def test_invalid_json_line_and_encoding(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"prompt": "a"}\n{"prompt": \n\xff\xfe{"prompt": "c"}\n[1]\n')
    records = list(formats.read_records(p, str(p)))
    assert [r.line for r in records] == [1, 2, 3, 4]
    assert records[1].error.startswith("invalid JSON")
    assert records[2].error.startswith("not valid UTF-8")
    assert "expected a JSON object" in records[3].error


def test_utf16_and_empty_files(tmp_path):
    p = tmp_path / "u.jsonl"
    p.write_bytes('{"prompt": "a"}\n'.encode("utf-16"))
    with pytest.raises(BadInput, match="UTF-16"):
        list(formats.read_records(p, str(p)))
    e = tmp_path / "e.jsonl"
    e.write_bytes(b"")
    with pytest.raises(BadInput, match="empty"):
        formats.read_records(e, str(e))


def test_unknown_extension(tmp_path):
    p = tmp_path / "data.txt"
    p.write_text("x")
    with pytest.raises(BadInput, match="unknown file type"):
        formats.read_records(p, str(p))


json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=3) |
                           st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(
    st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "margin", "x"]), json_values,
                    max_size=5).map(json.dumps),
    st.text(max_size=30).filter(lambda s: "\n" not in s and "\r" not in s)), min_size=1, max_size=12))
def test_jsonl_parser_never_crashes_and_accounts_for_every_line(tmp_path_factory, lines):
    """Every non-blank line comes back as a row or a problem, with its own line number."""
    p = tmp_path_factory.mktemp("h") / "h.jsonl"
    content = "\n".join(lines) + "\n"
    p.write_text(content, encoding="utf-8")
    if "\x00" in content:  # raw NUL bytes: refused as a binary/UTF-16 file, clearly
        with pytest.raises(BadInput, match="NUL bytes"):
            list(formats.read_records(p, str(p)))
        return
    records = list(formats.read_records(p, str(p)))
    expected = [i for i, line in enumerate(lines, start=1) if line.strip()]
    assert [r.line for r in records] == expected
    for r in records:
        out = formats.normalise(r, "preference", "pairs")
        assert isinstance(out, (list, formats.RowProblem))
        if isinstance(out, list):
            assert all(isinstance(row["prompt"], str) for row in out)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=15), st.text(max_size=15), st.text(max_size=15)),
                min_size=1, max_size=10))
def test_csv_roundtrip_keeps_every_row_and_its_line(tmp_path_factory, rows):
    """Whatever the cell text (quotes, commas, newlines), the reader gives back each row
    with the line it starts on."""
    import csv

    rows = [tuple(c.replace("\x00", "").replace("\r", "") for c in r) for r in rows]
    p = tmp_path_factory.mktemp("c") / "c.csv"
    with open(p, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prompt", "chosen", "rejected"])
        starts, line = [], 2
        for r in rows:
            starts.append(line)
            writer.writerow(r)
            line += 1 + sum(c.count("\n") for c in r)
    records = list(formats.read_records(p, str(p)))
    assert [r.line for r in records] == starts
    for record, r in zip(records, rows):
        assert record.error is None
        assert [record.data[k] if isinstance(record.data[k], str) else r[i]
                for i, k in enumerate(("prompt", "chosen", "rejected"))] == list(r)


def test_deeply_nested_json_is_a_row_problem_not_a_crash(tmp_path):
    p = tmp_path / "deep.jsonl"
    p.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
                 + '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    records = list(formats.read_records(p, str(p)))
    assert records[0].data is not None
    assert records[1].line == 2 and records[1].error == "JSON nested too deeply"


@pytest.mark.parametrize("margin", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_margins_are_quarantined(tmp_path, margin):
    p = tmp_path / "m.jsonl"
    p.write_text('{"prompt": "q", "chosen": "a", "rejected": "b", "margin": %s}\n' % margin)
    _, out = rows_of(p)
    assert isinstance(out[0], formats.RowProblem) and out[0].field == "margin"
    assert "finite" in out[0].reason


def test_ranked_rows_are_capped(tmp_path):
    ok = [f"r{i}" for i in range(16)]  # 120 pairs: at the cap
    too_many = [f"r{i}" for i in range(17)]  # 136 pairs
    p = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "q", "responses": ok},
                                           {"prompt": "q2", "responses": too_many}])
    _, out = rows_of(p)
    assert len(out[0]) == 120
    assert isinstance(out[1], formats.RowProblem) and out[1].field == "responses"
    assert "136 pairs" in out[1].reason
