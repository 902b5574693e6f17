"""Read every supported dataset format; normalise to one canonical row shape.

Readers yield ``RawRecord``s (the 1-based line or row number, the parsed mapping or the
reason it could not be parsed).  ``normalise`` turns one raw record into canonical rows:

* preference: ``{"prompt", "chosen", "rejected", "margin", "messages"}`` (margin may be None);
* sft: ``{"prompt", "completion", "messages"}``;
* prompt: ``{"prompt", "messages"}``; eval: ``{"prompt", "messages", "reference",
  "reference_minutes"}``, the reference being an optional answer written by an expert
  (field ``reference``) and the minutes it took to write (optional, with a reference).

``messages`` is the prompt's conversation as JSON (chat data, every turn kept, for the
tokenizer's chat template) or None (plain text); ``prompt`` is its text as people read it
(a lone user turn as is, else role-labelled turns): what reviewers see, what duplicates
and eval leakage are checked on.

Formats (DESIGN.md):
* ``pairs``  -- TRL style ``prompt/chosen/rejected`` (+ optional ``margin``);
* ``ranked`` -- ``prompt`` + ``responses`` best to worst, or + ``ranks`` (1 = best); every
  ordered pair of differently ranked responses becomes one pair (equal ranks: no pair);
* ``vertex`` -- ``input_text/candidate_0/candidate_1/choice`` (choice 0 or 1);
* ``chat``   -- ``messages`` lists, or TRL conversational pairs whose prompt/chosen/rejected
  are message lists.  The prompt is the conversation before the answer (kept whole in
  ``messages``), chosen/rejected the assistant's last message.

A record that cannot be normalised becomes a ``RowProblem`` (quarantined, never dropped).
"""

from __future__ import annotations

import csv
import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from rlhf_tasks.errors import BadInput
from rlhf_tasks.prompting import render_turns

FORMAT_FIELDS = {
    "pairs": ("prompt", "chosen", "rejected"),
    "ranked": ("prompt", "responses"),
    "vertex": ("input_text", "candidate_0", "candidate_1", "choice"),
    "chat": ("messages",),
    "prompt": ("prompt",),
    "input_text": ("input_text",),
    "completion": ("prompt", "completion"),
}
# the response columns of each dataset kind: checked for emptiness, length and duplicates
TARGET_COLUMNS = {"preference": ("chosen", "rejected"), "sft": ("completion",)}
# a ranked list of n responses expands to n(n-1)/2 pairs: 16 responses make 120
MAX_PAIRS_PER_RANKED_ROW = 120
MAX_REFERENCE_CHARS = 20_000
KNOWN_FIELDS = sorted({f for fields in FORMAT_FIELDS.values() for f in fields} |
                      {"margin", "ranks", "reference", "reference_minutes"})


@dataclass
class RawRecord:
    line: int
    data: dict[str, Any] | None
    raw: str
    error: str | None = None
    field: str | None = None


@dataclass
class RowProblem:
    line: int
    field: str | None
    reason: str
    raw: str


def _clip(text: str, n: int = 300) -> str:
    return text if len(text) <= n else text[:n] + "..."


# -- readers -------------------------------------------------------------------------------
def sniff_file_type(path: str) -> str:
    name = path.lower()
    for suffix, kind in ((".jsonl", "jsonl"), (".json", "jsonl"), (".ndjson", "jsonl"),
                         (".csv", "csv"), (".parquet", "parquet"), (".pq", "parquet")):
        if name.endswith(suffix):
            return kind
    raise BadInput("unknown file type; expected .jsonl, .csv or .parquet", file=path)


def _check_encoding_head(head: bytes, source: str) -> None:
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise BadInput("file is UTF-16 encoded; save it as UTF-8", file=source)
    if b"\x00" in head[:4096]:
        raise BadInput("file contains NUL bytes: a binary file or UTF-16/32 text; "
                       "expected UTF-8 text", file=source)


def read_jsonl(path: Path, source: str) -> Iterator[RawRecord]:
    with open(path, "rb") as fh:
        _check_encoding_head(fh.read(4096), source)
        fh.seek(0)
        for number, blob in enumerate(fh, start=1):
            if number == 1 and blob.startswith(b"\xef\xbb\xbf"):
                blob = blob[3:]
            try:
                text = blob.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield RawRecord(number, None, repr(_clip(blob.decode("utf-8", "replace"))),
                                f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            if not text.strip():
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                yield RawRecord(number, None, _clip(text.strip()),
                                f"invalid JSON: {exc.msg} at column {exc.colno}")
                continue
            except RecursionError:
                yield RawRecord(number, None, _clip(text.strip()), "JSON nested too deeply")
                continue
            if not isinstance(data, dict):
                yield RawRecord(number, None, _clip(text.strip()),
                                f"expected a JSON object, got {type(data).__name__}")
                continue
            yield RawRecord(number, data, _clip(text.strip()))


def _maybe_json(value: str) -> Any:
    stripped = value.strip()
    if stripped[:1] in "[{":
        try:
            return json.loads(stripped)
        except (json.JSONDecodeError, RecursionError):
            return value
    return value


def read_csv(path: Path, source: str) -> Iterator[RawRecord]:
    with open(path, "rb") as fh:
        head = fh.read(4096)
    _check_encoding_head(head, source)
    with open(path, "r", encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        try:
            if not reader.fieldnames:
                return
            while True:
                start = reader.line_num + 1
                try:
                    row = next(reader)
                except StopIteration:
                    return
                if None in row:  # more cells than header columns
                    yield RawRecord(start, None, _clip(str(row)),
                                    f"{len(row[None])} more cells than header columns")
                    continue
                data = {k: _maybe_json(v) if isinstance(v, str) else v for k, v in row.items()}
                yield RawRecord(start, data, _clip(json.dumps(row, ensure_ascii=False)))
        except UnicodeDecodeError as exc:
            raise BadInput(f"not valid UTF-8 near line {reader.line_num + 1} ({exc.reason}); "
                           "save the file as UTF-8", file=source) from None
        except csv.Error as exc:
            raise BadInput(f"malformed CSV: {exc}", file=source,
                           line=reader.line_num) from None


def read_parquet(path: Path, source: str) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - any pyarrow error means: not a parquet file
        raise BadInput(f"not a readable Parquet file: {exc}", file=source) from None
    number = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            number += 1
            yield RawRecord(number, row, _clip(json.dumps(row, default=str, ensure_ascii=False)))


def read_records(path: Path, source: str) -> Iterator[RawRecord]:
    kind = sniff_file_type(source)
    if path.stat().st_size == 0:
        raise BadInput("file is empty", file=source)
    return {"jsonl": read_jsonl, "csv": read_csv, "parquet": read_parquet}[kind](path, source)


# -- format detection ----------------------------------------------------------------------
def detect_format(fields: set[str], kind: str, source: str) -> str:
    """Pick the format whose required fields are present; explain when none fits."""
    if kind == "preference":
        if {"prompt", "chosen", "rejected"} <= fields or {"chosen", "rejected"} <= fields:
            return "pairs"  # chat-ness of pairs is decided per row (message lists)
        for name in ("ranked", "vertex"):
            if set(FORMAT_FIELDS[name]) <= fields:
                return name
        candidates = ("pairs", "ranked", "vertex")
    elif kind == "sft":
        for name in ("completion", "chat"):
            if set(FORMAT_FIELDS[name]) <= fields:
                return name
        candidates = ("completion", "chat")
    else:
        for name in ("prompt", "input_text", "chat"):
            if set(FORMAT_FIELDS[name]) <= fields:
                return name
        candidates = ("prompt", "input_text", "chat")
    hints = []
    for field in sorted(fields):
        close = difflib.get_close_matches(field, KNOWN_FIELDS, n=1, cutoff=0.75)
        if close and close[0] != field:
            hints.append(f"'{field}' looks like a misspelling of '{close[0]}'")
    wanted = "; ".join(f"{c}: {', '.join(FORMAT_FIELDS[c])}" for c in candidates)
    message = (f"no {kind} format matches the columns {sorted(fields)}; expected one of "
               f"[{wanted}]")
    if hints:
        message += "; " + "; ".join(hints)
    raise BadInput(message, file=source, field=", ".join(sorted(fields)) or None)


# -- normalisation -------------------------------------------------------------------------
class _Bad(Exception):
    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


def _text(data: dict, field: str) -> str:
    if field not in data or data[field] is None:
        raise _Bad(field, "missing field")
    value = data[field]
    if not isinstance(value, str):
        raise _Bad(field, f"expected a string, got {type(value).__name__}")
    return value.strip()


def _messages(value: Any, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise _Bad(field, "expected a non-empty list of messages")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str) \
                or msg.get("role") not in ("system", "user", "assistant"):
            raise _Bad(f"{field}[{i}]", "expected {'role': system|user|assistant, "
                                        "'content': string}")
        out.append({"role": msg["role"], "content": msg["content"].strip()})
    return out


def _chat_prompt(messages: list[dict[str, str]]) -> dict[str, str]:
    """The canonical prompt columns of a conversation (before the answer)."""
    return {"prompt": render_turns(messages),
            "messages": json.dumps(messages, ensure_ascii=False)}


def _split_conversation(messages: list[dict[str, str]], field: str) -> tuple[list, str]:
    if messages[-1]["role"] != "assistant":
        raise _Bad(field, "the last message must be the assistant's answer")
    return messages[:-1], messages[-1]["content"]


def _margin(data: dict) -> float | None:
    value = data.get("margin")
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise _Bad("margin", "expected a number, got bool")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _Bad("margin", f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise _Bad("margin", f"expected a finite number, got {value!r}")
    return number


def _pairs(data: dict) -> list[dict]:
    if isinstance(data.get("chosen"), list) or isinstance(data.get("prompt"), list):
        chosen_msgs = _messages(data.get("chosen"), "chosen")
        rejected_msgs = _messages(data.get("rejected"), "rejected")
        if "prompt" in data and data["prompt"] is not None:
            prompt_msgs = _messages(data["prompt"], "prompt")
            chosen, rejected = chosen_msgs[-1]["content"], rejected_msgs[-1]["content"]
        else:  # implicit prompt: the shared conversation before the last answer
            prompt_msgs, chosen = _split_conversation(chosen_msgs, "chosen")
            other_prompt, rejected = _split_conversation(rejected_msgs, "rejected")
            if other_prompt != prompt_msgs:
                raise _Bad("rejected", "conversation differs from 'chosen' before the answer")
            if not prompt_msgs:
                raise _Bad("chosen", "no prompt turn before the answer")
        return [{**_chat_prompt(prompt_msgs), "chosen": chosen, "rejected": rejected,
                 "margin": _margin(data)}]
    return [{"prompt": _text(data, "prompt"), "chosen": _text(data, "chosen"),
             "rejected": _text(data, "rejected"), "margin": _margin(data), "messages": None}]


def _ranked(data: dict) -> list[dict]:
    prompt = _text(data, "prompt")
    responses = data.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise _Bad("responses", "expected a list of at least 2 responses")
    if not all(isinstance(r, str) for r in responses):
        raise _Bad("responses", "every response must be a string")
    ranks = data.get("ranks")
    if ranks is None:
        ranks = list(range(1, len(responses) + 1))
    if not isinstance(ranks, list) or len(ranks) != len(responses) or not all(
            isinstance(r, int) and not isinstance(r, bool) for r in ranks):
        raise _Bad("ranks", f"expected {len(responses)} integer ranks (1 = best)")
    pairs = len(responses) * (len(responses) - 1) // 2
    if pairs > MAX_PAIRS_PER_RANKED_ROW:
        raise _Bad("responses", f"{len(responses)} responses make {pairs} pairs, over the cap "
                                f"of {MAX_PAIRS_PER_RANKED_ROW} per row; split the ranking")
    order = sorted(range(len(responses)), key=lambda i: ranks[i])
    rows = []
    for a, i in enumerate(order):
        for j in order[a + 1:]:
            if ranks[i] == ranks[j]:
                continue  # a tie says nothing about preference
            rows.append({"prompt": prompt, "chosen": responses[i].strip(),
                         "rejected": responses[j].strip(), "margin": None, "messages": None})
    return rows


def _vertex(data: dict) -> list[dict]:
    prompt = _text(data, "input_text")
    first, second = _text(data, "candidate_0"), _text(data, "candidate_1")
    choice = data.get("choice")
    if isinstance(choice, str) and choice.strip() in ("0", "1"):
        choice = int(choice)
    if isinstance(choice, bool) or choice not in (0, 1):
        raise _Bad("choice", f"expected 0 or 1, got {choice!r}")
    chosen, rejected = (first, second) if choice == 0 else (second, first)
    return [{"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": _margin(data),
             "messages": None}]


def _prompt_row(data: dict, fmt: str) -> list[dict]:
    if fmt == "chat":
        messages = _messages(data.get("messages"), "messages")
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not any(m["role"] == "user" for m in messages):
            raise _Bad("messages", "no user turn")
        return [_chat_prompt(messages)]
    return [{"prompt": _text(data, fmt), "messages": None}]


def _sft_row(data: dict, fmt: str) -> list[dict]:
    """Prompt + reference response; chat: the last assistant turn is the response."""
    if fmt == "chat":
        prompt_msgs, completion = _split_conversation(_messages(data.get("messages"), "messages"),
                                                      "messages")
        if not prompt_msgs:
            raise _Bad("messages", "no prompt turn before the answer")
        return [{**_chat_prompt(prompt_msgs), "completion": completion}]
    return [{"prompt": _text(data, "prompt"), "completion": _text(data, "completion"),
             "messages": None}]


NORMALISERS = {"pairs": _pairs, "ranked": _ranked, "vertex": _vertex, "chat": _pairs}


def normalise(record: RawRecord, kind: str, fmt: str) -> list[dict] | RowProblem:
    if record.error:
        return RowProblem(record.line, record.field, record.error, record.raw)
    try:
        if kind == "preference":
            return NORMALISERS[fmt](record.data)
        if kind == "sft":
            return _sft_row(record.data, fmt)
        rows = _prompt_row(record.data, fmt)
        if kind == "eval":
            reference = _reference(record.data)
            rows = [{**row, "reference": reference,
                     "reference_minutes": _reference_minutes(record.data, reference)}
                    for row in rows]
        return rows
    except _Bad as bad:
        return RowProblem(record.line, bad.field, bad.reason, record.raw)


def records_fields(records: list[RawRecord]) -> set[str]:
    fields: set[str] = set()
    for record in records:
        if record.data:
            fields |= set(record.data)
    return fields


def _reference(data: dict) -> str | None:
    """An eval row's optional ``reference``: an answer written by an expert, reviewed
    blinded beside the models' answers (None when absent or blank)."""
    value = data.get("reference")
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Bad("reference", f"expected a string, got {type(value).__name__}")
    if len(value) > MAX_REFERENCE_CHARS:
        raise _Bad("reference", f"longer than {MAX_REFERENCE_CHARS} characters")
    return value.strip() or None


def _reference_minutes(data: dict, reference: str | None) -> float | None:
    """How long the expert took to write the row's reference, in minutes (optional: the
    cost of writing an answer by hand, measured in the data; 0 < minutes <= 1440)."""
    value = data.get("reference_minutes")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise _Bad("reference_minutes", f"expected a number of minutes, got {value!r}")
    try:
        minutes = float(value)
    except (TypeError, ValueError):
        raise _Bad("reference_minutes", f"expected a number of minutes, got {value!r}") from None
    if not 0.0 < minutes <= 1440.0:  # also refuses nan and inf
        raise _Bad("reference_minutes", f"{value!r} is not between 0 and 1440 minutes")
    if reference is None:
        raise _Bad("reference_minutes", "given without a reference answer")
    return minutes


def canonical_columns(kind: str) -> list[str]:
    if kind == "preference":
        return ["prompt", "chosen", "rejected", "margin", "messages"]
    if kind == "sft":
        return ["prompt", "completion", "messages"]
    if kind == "eval":
        return ["prompt", "messages", "reference", "reference_minutes"]
    return ["prompt", "messages"]

