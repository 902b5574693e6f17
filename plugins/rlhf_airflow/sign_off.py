"""``SignOffOperator``: the named approver's sign-off on a promotion (Airflow HITL).

An ``ApprovalOperator`` that reads the run's config at run time: ``panel.approver`` (the
base config's; the trigger form cannot set it) is the one assigned user, and
``panel.sign_off_timeout_hours`` bounds the wait.  No answer by then counts as Reject
(``defaults``), and the task log says so when the wait starts.

Only the assigned user can answer (Airflow refuses anyone else).  On top of that:

* the user who triggered the run may not sign it off (refused before the request is
  made, and again by ``promote``);
* the response (options, who, when) is written to ``<run>/sign_off/response.json``;
  ``promote`` moves nothing without an Approve there from the approver, so marking this
  task successful by hand promotes nothing;
* a rejection (or a timeout) is written into the candidate version's tags.

A rejection skips the promotion, whatever the downstream trigger rules.

The DAG gives this task one retry: Airflow 3.3.2 can lose a task resumed by an answer that
comes within a scheduler loop or two of the task parking (the parking worker's exit is then
taken for a task killed externally).  The retry asks the approver again (Airflow clears the
lost answer), where the run would otherwise fail after its whole training.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Sequence

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk.exceptions import AirflowFailException


class SignOffOperator(ApprovalOperator):
    template_fields: Sequence[str] = (*ApprovalOperator.template_fields, "config_uri")

    def __init__(self, *, config_uri: str, **kwargs):
        kwargs.setdefault("ignore_downstream_trigger_rules", True)
        kwargs.setdefault("defaults", [self.REJECT])
        super().__init__(**kwargs)
        self.config_uri = config_uri

    def _config(self):
        from rlhf_tasks import config

        return config.load(self.config_uri)

    def execute(self, context):
        cfg = self._config()
        approver = cfg.panel.approver
        if not approver:
            raise AirflowFailException("sign_off ran but the run's config names no approver")
        if approver == cfg.run.triggered_by:
            raise AirflowFailException(f"{approver!r} triggered this run and cannot sign it "
                                       "off; nothing is promoted")
        self.assigned_users = [{"id": approver, "name": approver}]
        self.response_timeout = timedelta(hours=cfg.panel.sign_off_timeout_hours)
        self.log.info("sign-off requested from %s; no answer within %.1f h counts as Reject",
                      approver, cfg.panel.sign_off_timeout_hours)
        return super().execute(context)

    def execute_complete(self, context, event: dict[str, Any]) -> Any:
        # Airflow 3.3 resumes a timed-out request with the default option, "timedout" set
        # and no responder; an error event is the parent's to raise, and is not recorded
        if "error" not in event:
            self._record(event, bool(event.get("timedout")) or not event.get("responded_by_user"))
        return super().execute_complete(context, event)

    def _record(self, event: dict[str, Any], timed_out: bool) -> None:
        from rlhf_tasks import registry
        from rlhf_tasks.steps.panel import SIGN_OFF_FILE
        from rlhf_tasks.storage import Storage

        cfg = self._config()
        storage = Storage.from_config(cfg)
        chosen = list(event.get("chosen_options") or [])
        by = event.get("responded_by_user") or None
        at = event.get("responded_at")
        record = {"chosen_options": chosen, "responded_by_user": by,
                  "responded_at": at.isoformat() if hasattr(at, "isoformat") else at,
                  "timed_out": timed_out, "approver": cfg.panel.approver}
        storage.write_json(cfg.step_uri(*SIGN_OFF_FILE), record)
        if chosen != [self.APPROVE]:
            gate = storage.read_json(cfg.step_uri("gate", "gate.json"))
            who = "nobody (timed out)" if timed_out else (by or {}).get("id", "?")
            registry.reject(cfg, gate["model_name"], gate["version"],
                            f"sign-off rejected by {who}", decision="sign_off_rejected")
            self.log.info("sign-off: rejected by %s; version %s tagged", who, gate["version"])
