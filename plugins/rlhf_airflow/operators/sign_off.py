"""``SignOffOperator``: the named approver's sign-off on a promotion (Airflow HITL).

An ``ApprovalOperator`` that reads the run's config at run time: ``panel.approver`` (an
Airflow user id, from the base config; the trigger form cannot set it) is the one assigned
user, and ``panel.sign_off_timeout_hours`` bounds the wait.  No answer by then counts as
Reject (``defaults``), and the task log says so when the wait starts.

Only the assigned user can answer (Airflow refuses anyone else).  On top of that:

* the user who triggered the run may not sign it off (compared by id; refused before the
  request is made, and again by the promote step);
* on an Approve, this task runs the promote step itself, handing it the approver's id
  from Airflow's own record of the answer (the trigger's event) on the step's command
  line.  No file in the artifact store, XCom or task state stands for an approval, so
  marking a task successful by hand, or writing a file, promotes nothing; the ``promote``
  task runs only for runs that need no sign-off;
* the response (options, who, when) is written to ``<run>/sign_off/response.json`` for
  the record; a rejection (or a timeout) is written into the candidate version's tags,
  and the task ends skipped (nothing promoted, no champion Asset event).

The DAG gives this task one retry: Airflow 3.3.2 can lose a task resumed by an answer that
comes within a scheduler loop or two of the task parking (the parking worker's exit is then
taken for a task killed externally).  The retry asks the approver again (Airflow clears the
lost answer), where the run would otherwise fail after its whole training.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Sequence

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException


class SignOffOperator(ApprovalOperator):
    """The approver's sign-off on a promotion (see the module).

    Takes the ``ApprovalOperator``'s arguments (``subject``, ``body``, ``notifiers`` ...);
    the assigned user and the timeout come from the run's config at run time
    (``panel.approver``, ``panel.sign_off_timeout_hours``), and ``defaults`` is Reject.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("ignore_downstream_trigger_rules", True)
        kwargs.setdefault("defaults", [self.REJECT])
        super().__init__(**kwargs)

    @staticmethod
    def _config(context):
        """The run's own config (derived from the run, pinned by its digest)."""
        from rlhf_airflow.run_config import load_run_config

        return load_run_config(context)

    def execute(self, context):
        cfg = self._config(context)
        approver = cfg.panel.approver
        if not approver:
            raise AirflowFailException("sign_off ran but the run's config names no approver")
        if cfg.run.triggered_by and not cfg.run.triggered_by_id:
            raise AirflowFailException(f"the id of {cfg.run.triggered_by!r}, who triggered "
                                       "this run, is unknown: nothing is promoted")
        if approver == cfg.run.triggered_by_id:
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
            self._record(context, event,
                         bool(event.get("timedout")) or not event.get("responded_by_user"))
        answer = super().execute_complete(context, event)
        if list(answer["chosen_options"]) != [self.APPROVE]:
            raise AirflowSkipException("sign-off rejected: nothing is promoted")
        return {**answer, "promotion": self._promote(context, answer)}

    def _promote(self, context, answer) -> dict:
        """The promote step, with the approver's id from Airflow's record of the answer."""
        import json

        from rlhf_airflow.backends import step_argv
        from rlhf_airflow.operators.step import announce, run_local_step
        from rlhf_airflow.run_config import resolve

        cfg = self._config(context)
        by = (answer.get("responded_by_user") or {}).get("id")
        if by is None or by != cfg.panel.approver or by == cfg.run.triggered_by_id:
            raise AirflowFailException(f"the approval came from {by!r}; only "
                                       f"{cfg.panel.approver!r}, who did not trigger the run, "
                                       "may approve: nothing is promoted")
        uri, digest = resolve(context)
        parent = (context["ti"].xcom_pull(task_ids="start_tracking") or {}).get(
            "parent_run_id") or ""
        argv = step_argv("promote", uri, [f"tracking.parent_run_id={parent}",
                                          f"run.approved_by={json.dumps(str(by))}"],
                         "@RESULT@", digest)
        return announce(self, context, run_local_step("promote", argv, self.log.info))

    def _record(self, context, event: dict[str, Any], timed_out: bool) -> None:
        from rlhf_tasks import registry
        from rlhf_tasks.steps.panel import SIGN_OFF_FILE
        from rlhf_tasks.storage import Storage

        cfg = self._config(context)
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
