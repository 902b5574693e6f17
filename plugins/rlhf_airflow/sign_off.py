"""``SignOffOperator``: the named approver's sign-off on a promotion (Airflow HITL).

An ``ApprovalOperator`` whose approver is read at run time (the run config's
``panel.approver``, through the templated ``approver`` field), so one DAG serves runs
with and without a sign-off.  Airflow's UI shows the request with the panel's figures;
only the assigned user can answer.  A rejection skips the promotion, whatever the
downstream trigger rules.
"""

from __future__ import annotations

from typing import Sequence

from airflow.providers.standard.operators.hitl import ApprovalOperator


class SignOffOperator(ApprovalOperator):
    template_fields: Sequence[str] = (*ApprovalOperator.template_fields, "approver")

    def __init__(self, *, approver: str, **kwargs):
        kwargs.setdefault("ignore_downstream_trigger_rules", True)
        super().__init__(**kwargs)
        self.approver = approver

    def execute(self, context):
        if self.approver:
            self.assigned_users = [{"id": self.approver, "name": self.approver}]
        return super().execute(context)
