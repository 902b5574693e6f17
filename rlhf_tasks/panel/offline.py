"""Offline panels: export a batch to CSV or JSONL, import the filled-in verdicts.

The export holds what a reviewer may see (item id, prompt, response, quality bar) and
empty ``verdict`` and ``comment`` columns.  Import is all or nothing: every row is
checked first, and any bad row stops the import with its file, line and field named.
Rows left blank are skipped (not judged yet); rows the reviewer already judged are
skipped, so a file can be imported again safely.  The reviewer is named by the admin
running the import (``--reviewer``): the file carries no identity.  ``seconds`` (optional)
is the time the reviewer declares for the verdict; left blank, the verdict has no time
(an offline panel's time cannot be measured).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_tasks.errors import BadInput
from rlhf_tasks.panel.store import AlreadyJudged, BatchClosed, PanelStore

COLUMNS = ["item_id", "prompt", "response", "quality_bar", "verdict", "comment", "seconds"]
MAX_DECLARED_SECONDS = 86400.0
PASS_WORDS = {"pass", "passed", "p", "yes", "y", "true", "1"}
FAIL_WORDS = {"fail", "failed", "f", "no", "n", "false", "0"}


def parse_verdict(value) -> bool | None:
    """``pass``/``fail`` (and yes/no, true/false, 1/0, any case); None when blank."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if not text:
        return None
    if text in PASS_WORDS:
        return True
    if text in FAIL_WORDS:
        return False
    raise ValueError(f"verdict {value!r} is not pass or fail")


def parse_seconds(value) -> float | None:
    """A declared time in seconds (0 to a day); None when blank."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number of seconds")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a number of seconds") from None
    if not 0.0 <= seconds <= MAX_DECLARED_SECONDS:  # also refuses nan and inf
        raise ValueError(f"{value!r} is not between 0 and {MAX_DECLARED_SECONDS:.0f}")
    return seconds


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise BadInput("offline review files are .csv or .jsonl", file=str(path))
    return suffix[1:]


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: str) -> str:
    """A cell a spreadsheet shows as text: one starting like a formula (``=``, ``+``,
    ``-``, ``@``, tab, carriage return) gets a leading apostrophe (OWASP's advice on CSV
    injection), so a model's answer cannot run in the reviewer's spreadsheet."""
    return "'" + value if isinstance(value, str) and value.startswith(_FORMULA_START) else value


def export_batch(store: PanelStore, batch_id: str, path: Path) -> int:
    batch = store.batch(batch_id)
    rows = [{"item_id": i["id"], "prompt": i["prompt"], "response": i["response"],
             "quality_bar": batch.quality_bar, "verdict": "", "comment": "",
             "seconds": ""}
            for i in store.items(batch_id)]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        if _format(path) == "csv":
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)
        else:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return len(rows)


def _read_rows(path: Path) -> list[tuple[int, dict | str]]:
    """(line number, row) pairs; a line that does not parse comes with its error text."""
    out = []
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            if _format(path) == "csv":
                reader = csv.DictReader(fh)
                missing = {"item_id", "verdict"} - set(reader.fieldnames or [])
                if missing:
                    raise BadInput(f"missing column(s) {', '.join(sorted(missing))}",
                                   file=str(path), line=1)
                for row in reader:
                    out.append((reader.line_num, row))
            else:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        row = f"not JSON ({exc.msg})"
                    out.append((n, row if isinstance(row, (dict, str)) else
                                "a line must be a JSON object"))
    except FileNotFoundError:
        raise BadInput("file not found", file=str(path)) from None
    except UnicodeDecodeError:
        raise BadInput("not UTF-8 text", file=str(path)) from None
    return out


@dataclass
class ImportReport:
    imported: int = 0
    blank: int = 0
    already_judged: int = 0
    errors: list[str] = field(default_factory=list)


def import_verdicts(store: PanelStore, path: Path, reviewer: str) -> ImportReport:
    report = ImportReport()
    checked = []
    known = _known_items(store)
    for line, row in _read_rows(path):
        if isinstance(row, str):
            report.errors.append(f"{path}:{line}: {row}")
            continue
        item_id = str(row.get("item_id") or "").strip()
        if not item_id:
            report.errors.append(f"{path}:{line}: item_id: missing")
            continue
        if item_id not in known:
            report.errors.append(f"{path}:{line}: item_id: no item {item_id!r} in the store")
            continue
        try:
            passed = parse_verdict(row.get("verdict"))
        except ValueError as exc:
            report.errors.append(f"{path}:{line}: verdict: {exc}")
            continue
        comment = row.get("comment") or ""
        if not isinstance(comment, str) or len(comment) > 5000:
            report.errors.append(f"{path}:{line}: comment: text of at most 5000 characters")
            continue
        try:
            seconds = parse_seconds(row.get("seconds"))
        except ValueError as exc:
            report.errors.append(f"{path}:{line}: seconds: {exc}")
            continue
        if passed is None:
            report.blank += 1
            continue
        checked.append((item_id, passed, comment, seconds))
    if report.errors:
        shown = "\n  ".join(report.errors[:20])
        more = f"\n  ... and {len(report.errors) - 20} more" if len(report.errors) > 20 else ""
        raise BadInput(f"{len(report.errors)} bad row(s), nothing imported:\n  {shown}{more}",
                       file=str(path))
    for item_id, passed, comment, seconds in checked:
        try:
            store.record_verdict(item_id, reviewer, passed, comment, source="import",
                                 seconds=seconds)
            report.imported += 1
        except AlreadyJudged:
            report.already_judged += 1
        except BatchClosed as exc:
            raise BadInput(f"{exc}; {report.imported} verdicts imported before it",
                           file=str(path)) from None
    return report


def _known_items(store: PanelStore) -> set[str]:
    from sqlalchemy import select

    from rlhf_tasks.panel.store import ReviewItem

    with store.session() as s:
        return set(s.scalars(select(ReviewItem.id)))
