"""Great Expectations 1.x suites, one per dataset kind, run in an ephemeral context.

Row rules are expectations over the canonical frame plus a few derived columns
(token counts, duplicate and leakage markers), evaluated with ``result_format=COMPLETE``
so that every failing row comes back by its ``_row`` index and can be quarantined with
the expectation's reason.  Table rules (minimum row count) run on the kept rows.
Data Docs are built into a local folder that the step stores as an artifact.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")


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

    def table_suite(self, name: str, df, min_rows: int) -> tuple[bool, str]:
        import great_expectations.expectations as gxe

        validation = self._run(name, df, [gxe.ExpectTableRowCountToBeBetween(min_value=min_rows)])
        item = validation.results[0]
        observed = item.result.get("observed_value")
        return bool(item.success), f"{observed} rows kept, at least {min_rows} required"
