"""Operator extra links: "MLflow run" on every step task, "Review page" on the panel wait.

Airflow 3 computes an extra link once, when the task finishes, in the task's own process
(``get_link`` on the operator that ran), and stores it in XCom under the link's key; the
UI reads it from there.  The step reports its run's page in its result
(``mlflow_run_url``: the child run of the step, the parent run for the bookkeeping
steps), so the link needs no MLflow client in the worker.
"""

from __future__ import annotations

from airflow.sdk import BaseOperatorLink


class MlflowRunLink(BaseOperatorLink):
    name = "MLflow run"

    def get_link(self, operator, *, ti_key) -> str:
        return getattr(operator, "mlflow_run_url", None) or ""


class ReviewPageLink(BaseOperatorLink):
    """The "Review page" button of the panel wait: where the reviewers judge the batch."""

    name = "Review page"

    def get_link(self, operator, *, ti_key) -> str:
        return getattr(operator, "review_page_url", None) or ""
