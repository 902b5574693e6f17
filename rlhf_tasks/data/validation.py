"""Validate one dataset: parse, run the GX suites, quarantine bad rows, write canonical data.

Nothing is lost: every row that is not kept is written to ``quarantine.jsonl`` with its
source line, field and reason.  When the bad share passes ``data.max_bad_fraction`` the
step fails (exit 2) naming the first problems, and no canonical file is written.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_tasks.data import formats
from rlhf_tasks.errors import BadInput

MIN_ROWS_FIELD = {"preference": "min_preference_rows", "prompt": "min_prompt_rows",
                  "eval": "min_eval_rows", "sft": "min_sft_rows"}


def reason_category(reason: str) -> str:
    return re.sub(r"\s*\(.*\)$", "", reason.split(":")[0]).strip()


def prompt_key(text: str) -> str:
    """Prompts compare equal when they differ only in case and white space."""
    return re.sub(r"\s+", " ", text).strip().casefold()


@dataclass
class Validated:
    kind: str
    source: str
    fmt: str
    rows_read: int
    frame: object  # pandas.DataFrame of kept canonical rows
    quarantine: list[dict]
    digest: str
    min_rows_message: str = ""
    table_failures: list[str] = field(default_factory=list)  # a team's table expectations

    @property
    def rows_kept(self) -> int:
        return len(self.frame)

    @property
    def bad_fraction(self) -> float:
        return len(self.quarantine) / self.rows_read if self.rows_read else 0.0

    def reasons(self) -> Counter:
        """Quarantined rows per reason category (details after ':' or in brackets dropped)."""
        return Counter(reason_category(r) for q in self.quarantine for r in q["reasons"])

    def summary(self) -> dict:
        return {"kind": self.kind, "source": self.source, "format": self.fmt,
                "rows_read": self.rows_read, "rows_kept": self.rows_kept,
                "rows_quarantined": len(self.quarantine),
                "bad_fraction": round(self.bad_fraction, 6),
                "quarantined_by_reason": dict(self.reasons().most_common()),
                "failed_table_expectations": self.table_failures, "digest": self.digest}


def count_tokens(tokenizer, texts: list[str]) -> list[int]:
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [len(ids) for ids in encoded]


def read_prompt_keys(storage, uri: str, max_file_mb: int) -> set[str]:
    """Prompt keys of an eval set, for the leakage check (rows that parse only)."""
    records = _read(storage, uri, max_file_mb)
    fmt = formats.detect_format(formats.records_fields(records), "eval", uri)
    keys = set()
    for record in records:
        rows = formats.normalise(record, "eval", fmt)
        if isinstance(rows, list):
            keys.update(prompt_key(r["prompt"]) for r in rows)
    return keys


def _read(storage, uri: str, max_file_mb: int) -> list[formats.RawRecord]:
    size = storage.size(uri)
    if size > max_file_mb * 1024 * 1024:
        raise BadInput(f"file is {size / 2**20:.0f} MiB, over data.max_file_mb={max_file_mb}; "
                       "split it or raise the limit", file=uri)
    with storage.local_copy(uri) as path:
        records = list(formats.read_records(path, uri))
    if not records:
        raise BadInput("file has no rows", file=uri)
    return records


def _content_digest(frame, columns: list[str]) -> str:
    digest = hashlib.sha256()
    for row in frame[columns].itertuples(index=False):
        digest.update(json.dumps(list(row), ensure_ascii=False, default=str).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def validate_dataset(*, storage, uri: str, kind: str, fmt: str, load_tokenizer, data_cfg,
                     eval_keys: set[str] | None, docs_dir: Path) -> Validated:
    import pandas as pd

    from rlhf_tasks.data.expectations import (ExpectationRunner, load_team_suites,
                                              make_offline, row_rules)

    records = _read(storage, uri, data_cfg.max_file_mb)
    fields = formats.records_fields(records)
    if not fields:
        problems = [{"line": r.line, "field": r.field, "reasons": [r.error]} for r in records]
        raise BadInput(f"no row could be parsed; first problems: {_first(problems, uri)}",
                       file=uri)
    if fmt == "auto" or kind != "preference":
        fmt = formats.detect_format(fields, kind, uri)
    elif fmt not in ("chat",):
        missing = [f for f in formats.FORMAT_FIELDS[fmt] if f not in fields]
        if missing:
            formats.detect_format(fields, kind, uri)  # raises with hints when nothing fits
            raise BadInput(f"format '{fmt}' needs columns {missing}, which the file lacks",
                           file=uri, field=", ".join(missing))

    rows, quarantine = [], []
    for record in records:
        out = formats.normalise(record, kind, fmt)
        if isinstance(out, formats.RowProblem):
            quarantine.append({"line": out.line, "field": out.field, "reasons": [out.reason],
                               "raw": out.raw})
            continue
        for row in out:
            row["_line"] = record.line
            rows.append(row)
    columns = formats.canonical_columns(kind)
    frame = pd.DataFrame(rows, columns=columns + ["_line"])
    if kind == "preference":
        frame["margin"] = pd.to_numeric(frame["margin"], errors="coerce").astype("float64")
    rows_read = len(frame) + len(quarantine)
    if frame.empty:
        raise BadInput(f"no row could be parsed; first problems: {_first(quarantine, uri)}",
                       file=uri)

    # only once the file has parsed (bad files fail fast); None: no token-length checks
    tokenizer = load_tokenizer() if load_tokenizer is not None else None
    # derived columns the expectations look at
    frame["_row"] = range(len(frame))
    if tokenizer is not None:
        frame["_prompt_tokens"] = count_tokens(tokenizer, frame["prompt"].tolist())
        for column in formats.TARGET_COLUMNS.get(kind, ()):
            frame[f"_{column}_tokens"] = count_tokens(tokenizer, frame[column].tolist())
    keys = frame["prompt"].map(prompt_key)
    dup_cols = [keys] + [frame[c].str.strip() for c in formats.TARGET_COLUMNS.get(kind, ())]
    dup_key = pd.Series(list(zip(*dup_cols)), index=frame.index)
    first_line = frame.groupby(dup_key, sort=False)["_line"].transform("first")
    is_dup = dup_key.duplicated(keep="first")
    frame["_duplicate_of_line"] = first_line.where(is_dup).astype("Int64").astype(object).where(
        is_dup, None)
    frame["_in_eval"] = keys.isin(eval_keys or set()) if kind != "eval" else False
    if kind == "preference":
        frame["_chosen_equals_rejected"] = frame["chosen"].str.strip() == frame["rejected"].str.strip()

    runner = ExpectationRunner(docs_dir)
    rules = row_rules(kind, *((data_cfg.max_prompt_tokens, data_cfg.max_target_tokens)
                              if tokenizer is not None else (None, None)))
    failures = runner.row_suite(f"{kind}-rows", frame, rules)
    for row_index, broken in sorted(failures.items()):
        reasons = [r.reason for r in broken]
        dup = frame.at[row_index, "_duplicate_of_line"]
        if dup is not None:
            reasons = [f"{r} (first seen on line {dup})" if r == "duplicate row" else r
                       for r in reasons]
        quarantine.append(_quarantined(frame, row_index, columns, broken[0].field, reasons))
    kept = frame.drop(index=list(failures)).reset_index(drop=True)
    # the data team's own suites, on the rows the built-in rules kept
    team_failures: list[str] = []
    for name, expectations in load_team_suites(storage, data_cfg.expectations_dir, kind):
        kept["_row"] = range(len(kept))
        bad_rows, failed = runner.team_suite(name, kept, expectations)
        team_failures += failed
        for row_index, broken in sorted(bad_rows.items()):
            quarantine.append(_quarantined(kept, row_index, columns, broken[0][1],
                                           [r for r, _ in broken]))
        kept = kept.drop(index=list(bad_rows)).reset_index(drop=True)
    table_ok, table_message = runner.table_suite(
        f"{kind}-table", kept[columns + ["_line"]].assign(_row=range(len(kept))),
        getattr(data_cfg, MIN_ROWS_FIELD[kind]))
    make_offline(docs_dir)

    kept = kept[columns + ["_line"]].rename(columns={"_line": "source_line"})
    quarantine.sort(key=lambda q: q["line"])
    outcome = Validated(kind, uri, fmt, rows_read, kept, quarantine,
                        _content_digest(kept, columns),
                        "" if table_ok else table_message, team_failures)
    return outcome


def _quarantined(frame, row_index: int, columns: list[str], column: str,
                 reasons: list[str]) -> dict:
    """The quarantine entry of a row an expectation failed: its source line, the field,
    the reasons, the row as it was read."""
    raw = {c: frame.at[row_index, c] for c in columns}
    return {"line": int(frame.at[row_index, "_line"]), "field": column, "reasons": reasons,
            "raw": json.dumps(raw, ensure_ascii=False, default=str)}


def _first(quarantine: list[dict], uri: str, n: int = 3) -> str:
    return "; ".join(
        f"{uri} line {q['line']}" + (f" field '{q['field']}'" if q.get("field") else "")
        + f": {', '.join(q['reasons'])}" for q in quarantine[:n])


def check_outcome(outcome: Validated, max_bad_fraction: float) -> None:
    """Raise BadInput (exit 2) when the dataset may not be used."""
    if outcome.bad_fraction > max_bad_fraction:
        raise BadInput(
            f"{len(outcome.quarantine)} of {outcome.rows_read} rows are bad "
            f"({outcome.bad_fraction:.1%} > data.max_bad_fraction={max_bad_fraction:g}); "
            f"first problems: {_first(outcome.quarantine, outcome.source)}", file=outcome.source)
    if outcome.min_rows_message:
        raise BadInput(f"too few rows: {outcome.min_rows_message}", file=outcome.source)
    if outcome.table_failures:
        raise BadInput("failed table expectations: " + "; ".join(outcome.table_failures),
                       file=outcome.source)


def write_outputs(outcome: Validated, out_dir: Path) -> None:
    """Write the quarantine and the report into ``out_dir`` (canonical data: see below)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    quarantine = out_dir / "quarantine.jsonl"
    with open(quarantine, "w", encoding="utf-8") as fh:
        for q in outcome.quarantine:
            fh.write(json.dumps({"source": outcome.source, **q}, ensure_ascii=False) + "\n")
    report = out_dir / "report.json"
    report.write_text(json.dumps(outcome.summary(), indent=2), encoding="utf-8")


def write_canonical(outcome: Validated, out_dir: Path) -> Path:
    path = out_dir / "canonical.parquet"
    outcome.frame.to_parquet(path, index=False)
    return path
