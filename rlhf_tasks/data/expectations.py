"""Great Expectations 1.x suites, one per dataset kind, run in an ephemeral context.

Row rules are expectations over the canonical frame plus a few derived columns
(token counts, duplicate and leakage markers), evaluated with ``result_format=COMPLETE``
so that every failing row comes back by its ``_row`` index and can be quarantined with
the expectation's reason.  Table rules (minimum row count) run on the kept rows.

* Every suite that ran is written out as GX suite JSON (``expectations/<suite>.json`` in
  the step's output): a data team's starting point for its own.
* A data team's own suites (``data.expectations_dir``: ``<kind>/*.json``, GX suite JSON)
  run after the built-in row rules: a failing row expectation quarantines the rows it
  names, with the expectation's name (``meta.reason``, else its type and column) as the
  reason; a failing table expectation fails the table, naming it.
* Data Docs are built into a local folder that the step stores as an artifact, and made
  to render offline: the pages' CDN assets are rewritten to the pinned npm packages
  vendored in ``docs_assets/vendor/`` (``scripts/vendor_docs_assets.sh``), copied into
  the site.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
log = logging.getLogger(__name__)

VENDOR = Path(__file__).parent / "docs_assets" / "vendor"
# what Data Docs pages load from CDNs -> the same file of the pinned npm package
CDN_ASSETS = {
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css":
        "bootstrap/dist/css/bootstrap.min.css",
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js":
        "bootstrap/dist/js/bootstrap.min.js",
    "https://code.jquery.com/jquery-3.7.1.min.js": "jquery/dist/jquery.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js":
        "popper.js/dist/umd/popper.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css":
        "@fortawesome/fontawesome-free/css/all.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/"
    "bootstrap-datepicker.min.css": "bootstrap-datepicker/dist/css/bootstrap-datepicker.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/"
    "bootstrap-datepicker.min.js": "bootstrap-datepicker/dist/js/bootstrap-datepicker.min.js",
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/"
    "bootstrap-prefers-dark.css":
        "@forevolve/bootstrap-dark/dist/css/bootstrap-prefers-dark.min.css",
    "https://cdn.jsdelivr.net/npm/vega@5": "vega/build/vega.min.js",
    "https://cdn.jsdelivr.net/npm/vega-lite@5": "vega-lite/build/vega-lite.min.js",
    "https://cdn.jsdelivr.net/npm/vega-embed@6": "vega-embed/build/vega-embed.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css":
        "bootstrap-table/dist/bootstrap-table.min.css",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js":
        "bootstrap-table/dist/bootstrap-table.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/"
    "bootstrap-table-filter-control.min.js":
        "bootstrap-table/dist/extensions/filter-control/bootstrap-table-filter-control.min.js",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/"
    "bootstrap-table-filter-control.css":
        "bootstrap-table/dist/extensions/filter-control/bootstrap-table-filter-control.min.css",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/"
    "bootstrap-table-filter-control.min.css":
        "bootstrap-table/dist/extensions/filter-control/bootstrap-table-filter-control.min.css",
}
_GX_LOGO = re.compile(r"https://great-expectations-web-assets\.s3\.[\w.-]+\.amazonaws\.com/"
                      r"(logo-long\.png)(\?[^\"']*)?")
# a page load (not a link) from another host
EXTERNAL_LOAD = re.compile(r"<(?:script|img)\b[^>]*\bsrc=[\"'](https?://[^\"']+)|"
                           r"<link\b[^>]*\bhref=[\"'](https?://[^\"']+)[^>]*>")


def make_offline(docs_dir: Path) -> list[str]:
    """Rewrite the site's pages to load their assets from ``static/vendor/`` (copied in);
    returns the external loads that remain (none with the GX version pinned here)."""
    docs_dir = Path(docs_dir)
    shutil.copytree(VENDOR, docs_dir / "static" / "vendor", dirs_exist_ok=True)
    left: set[str] = set()
    for page in docs_dir.rglob("*.html"):
        up = "../" * (len(page.relative_to(docs_dir).parts) - 1)
        text = page.read_text(encoding="utf-8")
        for url, rel in CDN_ASSETS.items():
            text = text.replace(f'"{url}"', f'"{up}static/vendor/{rel}"')
        text = _GX_LOGO.sub(lambda m: f"{up}static/images/{m.group(1)}", text)
        page.write_text(text, encoding="utf-8")
        for match in EXTERNAL_LOAD.finditer(text):
            tag = match.group(0)
            if match.group(1) or "stylesheet" in tag or "preload" in tag:
                left.add(match.group(1) or match.group(2))
    if left:
        log.warning("Data Docs still load from the network (add them to CDN_ASSETS and "
                    "scripts/vendor_docs_assets.sh): %s", sorted(left))
    return sorted(left)


@dataclass(frozen=True)
class RowRule:
    """One row-level expectation and the quarantine reason its failures get."""

    reason: str
    field: str
    expectation: str
    kwargs: tuple


def row_rules(kind: str, max_prompt_tokens: int | None,
              max_target_tokens: int | None) -> list[RowRule]:
    """The row expectations of ``kind``; the token-length ones only when the bounds are
    given (no tokenizer, no token counts)."""
    rules = [
        RowRule("empty prompt", "prompt", "ExpectColumnValueLengthsToBeBetween",
                (("column", "prompt"), ("min_value", 1))),
    ]
    if max_prompt_tokens is not None:
        rules.append(RowRule(f"prompt longer than {max_prompt_tokens} tokens", "prompt",
                             "ExpectColumnValuesToBeBetween",
                             (("column", "_prompt_tokens"), ("max_value", max_prompt_tokens))))
    rules += [
        RowRule("duplicate row", "prompt", "ExpectColumnValuesToBeNull",
                (("column", "_duplicate_of_line"),)),
    ]
    if kind != "eval":
        rules.append(RowRule("prompt also in the eval set (leakage)", "prompt",
                             "ExpectColumnValuesToBeInSet",
                             (("column", "_in_eval"), ("value_set", [False]))))
    if kind == "preference":
        rules.append(RowRule("chosen equals rejected", "chosen", "ExpectColumnValuesToBeInSet",
                             (("column", "_chosen_equals_rejected"), ("value_set", [False]))))
    from rlhf_tasks.data.formats import TARGET_COLUMNS

    for column in TARGET_COLUMNS.get(kind, ()):
        rules.append(RowRule(f"empty {column}", column, "ExpectColumnValueLengthsToBeBetween",
                             (("column", column), ("min_value", 1))))
        if max_target_tokens is not None:
            rules.append(RowRule(f"{column} longer than {max_target_tokens} tokens", column,
                                 "ExpectColumnValuesToBeBetween",
                                 (("column", f"_{column}_tokens"),
                                  ("max_value", max_target_tokens))))
    return rules


class ExpectationRunner:
    """Holds one ephemeral GX context with a Data Docs site in ``docs_dir``."""

    def __init__(self, docs_dir: Path):
        import great_expectations as gx

        logging.getLogger("great_expectations").setLevel(logging.WARNING)
        self.gx = gx
        self.docs_dir = Path(docs_dir)
        self.context = gx.get_context(mode="ephemeral")
        try:
            from great_expectations.data_context.types.base import ProgressBarsConfig

            self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        except Exception:  # noqa: BLE001 - cosmetic only
            pass
        self.context.add_data_docs_site(site_name="rlhf", site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(self.docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
        self.source = self.context.data_sources.add_pandas("rlhf")

    def _run(self, name: str, df, expectations: list) -> list:
        gx = self.gx
        asset = self.source.add_dataframe_asset(name)
        batch = asset.add_batch_definition_whole_dataframe(f"{name}-all")
        suite = self.context.suites.add(gx.ExpectationSuite(name=name))
        for expectation in expectations:
            suite.add_expectation(expectation)
        # the suite as GX suite JSON, beside the Data Docs
        out = self.docs_dir.parent / "expectations" / f"{name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(suite.to_json_dict(), indent=2, default=str), "utf-8")
        definition = self.context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suite))
        checkpoint = self.context.checkpoints.add(gx.Checkpoint(
            name=f"{name}-checkpoint", validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data-docs", site_names=["rlhf"])],
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["_row"]},
        ))
        result = checkpoint.run(batch_parameters={"dataframe": df})
        (validation,) = result.run_results.values()
        return validation

    def row_suite(self, name: str, df, rules: list[RowRule]) -> dict[int, list[RowRule]]:
        """Failing rows by ``_row`` index, with the rules each one broke."""
        import great_expectations.expectations as gxe

        expectations = [getattr(gxe, r.expectation)(**dict(r.kwargs)) for r in rules]
        validation = self._run(name, df, expectations)
        failures: dict[int, list[RowRule]] = {}
        for rule, item in zip(rules, validation.results):
            for hit in item.result.get("unexpected_index_list") or []:
                failures.setdefault(int(hit["_row"]), []).append(rule)
        return failures

    def team_suite(self, name: str, df, expectations: list
                   ) -> tuple[dict[int, list[tuple[str, str]]], list[str]]:
        """A data team's suite: failing rows by ``_row`` with (reason, field) per broken
        expectation; and the table expectations that failed, as messages."""
        validation = self._run(name, df, expectations)
        rows: dict[int, list[tuple[str, str]]] = {}
        table: list[str] = []
        for expectation, item in zip(expectations, validation.results):
            reason = team_reason(name, expectation)
            hits = item.result.get("unexpected_index_list")
            if hits:
                for hit in hits:
                    rows.setdefault(int(hit["_row"]), []).append(
                        (reason, getattr(expectation, "column", None) or ""))
            elif not item.success:
                observed = item.result.get("observed_value")
                table.append(reason + (f" (observed {observed})" if observed is not None
                                       else ""))
        return rows, table

    def table_suite(self, name: str, df, min_rows: int) -> tuple[bool, str]:
        import great_expectations.expectations as gxe

        validation = self._run(name, df, [gxe.ExpectTableRowCountToBeBetween(min_value=min_rows)])
        item = validation.results[0]
        observed = item.result.get("observed_value")
        return bool(item.success), f"{observed} rows kept, at least {min_rows} required"


def team_reason(suite: str, expectation) -> str:
    """A team expectation's name in quarantine reasons: ``meta.reason``, else
    ``<suite>: <type>(<column>)``."""
    meta = getattr(expectation, "meta", None) or {}
    if meta.get("reason"):
        return str(meta["reason"])
    column = getattr(expectation, "column", None)
    return f"{suite}: {expectation.expectation_type}" + (f"({column})" if column else "")


def load_team_suites(storage, folder: str | None, kind: str) -> list[tuple[str, list]]:
    """The GX suites of ``kind`` in a data team's folder (``<folder>/<kind>/*.json``):
    [(suite name, expectations)].  A file that is not a valid suite is BadInput naming
    the file and, where it is one expectation's fault, its index and type."""
    from great_expectations.expectations.expectation_configuration import (
        ExpectationConfiguration)

    from rlhf_tasks.errors import BadInput
    from rlhf_tasks.storage import join

    if not folder:
        return []
    prefix = join(folder, kind)
    suites = []
    for uri in sorted(u for u in storage.list(prefix) if u.endswith(".json")):
        try:
            raw = json.loads(storage.read_bytes(uri).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadInput(f"not a GX suite (JSON): {exc}", file=uri) from None
        if not isinstance(raw, dict) or not isinstance(raw.get("expectations"), list):
            raise BadInput("not a GX suite: needs a list 'expectations'", file=uri,
                           field="expectations")
        expectations = []
        for i, item in enumerate(raw["expectations"]):
            where = f"expectations[{i}]"
            if not isinstance(item, dict) or "type" not in item:
                raise BadInput("each expectation needs a 'type'", file=uri, field=where)
            try:
                expectations.append(ExpectationConfiguration(
                    type=item["type"], kwargs=item.get("kwargs") or {},
                    meta=item.get("meta")).to_domain_obj())
            except Exception as exc:  # noqa: BLE001 - GX raises many kinds
                message = " ".join(str(exc).split())[:300]
                raise BadInput(f"invalid expectation {item.get('type')!r}: {message}",
                               file=uri, field=where) from None
        name = str(raw.get("name") or Path(uri).stem)
        suites.append((f"team-{kind}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}", expectations))
    return suites
