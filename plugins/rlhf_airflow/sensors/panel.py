"""The expert-panel wait: ``PanelQuorumSensor``, a deferrable sensor.

``PanelQuorumSensor`` checks the verdict store once; when the batch still lacks verdicts
it defers to ``PanelQuorumTrigger``, which polls the store from the triggerer every
``panel.poll_seconds`` (no worker slot is held while people review) and fires on quorum
(every item has its k verdicts), when a sequential panel has decided (and closed its
batch: reviewers get no more of its items), or at the deadline (``panel.deadline_hours``
after the batch was made).  On quorum or decision the task returns the batch's progress; at the deadline it
times out as sensors do (``soft_fail``: skipped), and the ``gate`` step rejects.
The trigger is :class:`rlhf_airflow.triggers.panel.PanelQuorumTrigger`.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from airflow.sdk import BaseSensorOperator, PokeReturnValue
from airflow.sdk.exceptions import AirflowFailException, AirflowSensorTimeout

from rlhf_airflow.links import ReviewPageLink
from rlhf_airflow.triggers.panel import PanelQuorumTrigger, completion

def review_url(cfg) -> str:
    """Where reviewers judge: ``panel.review_url``, else the page inside Airflow."""
    if cfg.panel.review_url:
        return cfg.panel.review_url
    from airflow.sdk import conf

    from rlhf_airflow.review_app import URL_PREFIX

    base = conf.get("api", "base_url", fallback="") or "http://localhost:8080"
    return base.rstrip("/") + URL_PREFIX + "/"


class PanelQuorumSensor(BaseSensorOperator):
    """Wait until every item of the run's review batch has its k verdicts.

    The run's own config (``load_run_config``) names the store, the batch (the evaluation's
    record in the run's folder, never an id handed over in an XCom), the deadline and the
    poll interval; the task's result is the batch's progress with ``status`` (``quorum``,
    or ``decided`` for a sequential panel)
    and ``review_url``.

    :param deferrable: defer to :class:`PanelQuorumTrigger` while people review (default),
        so no worker slot is held for days; otherwise poke the store every
        ``poll_interval`` (``mode="reschedule"`` frees the slot between pokes).
    :param poll_interval: seconds between checks of the store; default the run config's
        ``panel.poll_seconds``.
    :param timeout: the longest wait in seconds, counted from the batch's creation; default
        the run config's ``panel.deadline_hours`` (the admin's base config).
    :param soft_fail: at the deadline, end ``skipped`` rather than ``failed``: the DAG
        sets it, and its ``gate`` (trigger rule ``none_failed``) then closes the batch and
        rejects, since the panel has not spoken.  A store that keeps failing fails the
        task either way.
    """

    ui_color = "#fff3cd"
    operator_extra_links = (ReviewPageLink(),)
    review_page_url: str | None = None

    def __init__(self, *, deferrable: bool = True, poll_interval: float | None = None,
                 timeout: float | None = None, **kwargs):
        # timeout None: the panel's deadline from the run's config, known at run time
        super().__init__(timeout=timeout if timeout is not None else 0, **kwargs)
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.deadline_seconds = timeout
        self.batch_id: str | None = None
        self.store_url: str | None = None

    def _prepare(self, context):
        """The run's config, and from it the store, batch, deadline and review page."""
        from rlhf_airflow.run_config import load_run_config
        from rlhf_tasks.errors import BadInput
        from rlhf_tasks.panel.store import panel_store_url
        from rlhf_tasks.storage import Storage

        cfg = load_run_config(context)
        try:
            self.batch_id = Storage.from_config(cfg).read_json(
                cfg.step_uri("evaluate", "evaluate.json"))["batch_id"]
        except BadInput as exc:
            raise AirflowFailException(str(exc)) from None
        self.store_url = panel_store_url(cfg)
        self.review_page_url = review_url(cfg)
        if self.poll_interval is None:
            self.poll_interval = cfg.panel.poll_seconds
        if self.deadline_seconds is None:
            self.deadline_seconds = cfg.panel.deadline_hours * 3600.0
        return cfg

    def _progress(self) -> tuple[dict, datetime, int]:
        from rlhf_tasks.panel.store import PanelStore

        with PanelStore(self.store_url) as store:
            batch = store.batch(self.batch_id)
            progress = store.progress(self.batch_id)
        return progress, batch.deadline(timedelta(seconds=self.deadline_seconds)), \
            batch.verdicts_per_item

    def _result(self, progress: dict) -> dict:
        return {**progress, "status": completion(progress), "review_url": self.review_page_url}

    def poke(self, context) -> bool | PokeReturnValue:
        progress, _, _ = self._progress()
        self.log.info("panel batch %s: %d of %d verdicts", self.batch_id,
                      progress["verdicts_given"], progress["verdicts_needed"])
        return PokeReturnValue(progress["complete"], self._result(progress))

    def execute(self, context):
        cfg = self._prepare(context)
        progress, deadline, k = self._progress()
        if progress["complete"]:
            return self._result(progress)
        left = (deadline - datetime.now(timezone.utc)).total_seconds()
        self.log.info("waiting for the panel: %d of %d verdicts; deadline %s; review page %s",
                      progress["verdicts_given"], progress["verdicts_needed"], deadline,
                      self.review_page_url)
        if left <= 0:
            self._timed_out(progress)
        # the wait starts: tell the panel (a sensor in reschedule mode runs this at every
        # poke, so it mails only when deferred or poking in one process)
        if progress["verdicts_given"] == 0 and (self.deferrable or self.mode == "poke"):
            from rlhf_airflow.notifications.rlhf import review_waiting

            review_waiting(context, batch_id=self.batch_id, items=progress["items"],
                           verdicts_needed=progress["verdicts_needed"], k=k,
                           review_url=self.review_page_url,
                           deadline_hours=cfg.panel.deadline_hours,
                           sequential="sequential" in progress)
        if not self.deferrable:
            self.timeout, self.poke_interval = left, float(self.poll_interval)
            return super().execute(context)
        # the trigger ends the wait at the deadline; Airflow's own timeout is a backstop
        self.defer(trigger=PanelQuorumTrigger(self.store_url, self.batch_id,
                                              deadline.isoformat(), self.poll_interval),
                   method_name="execute_complete",
                   timeout=timedelta(seconds=left + 2 * self.poll_interval + 60))

    def _timed_out(self, progress: dict):
        # resume_execution and the poke loop turn this into a skip under soft_fail
        raise AirflowSensorTimeout(
            f"no quorum by the panel's deadline: {progress['items_complete']} of "
            f"{progress['items']} items have their verdicts")

    def execute_complete(self, context, event: dict) -> dict:
        if event.get("status") == "error":
            # not an AirflowException: soft_fail must not turn a broken store into a skip
            raise RuntimeError(f"the panel store kept failing: {event['error']}")
        self._prepare(context)  # a resumed task is a new instance: its link needs the page
        self.log.info("panel %s: %d of %d items complete", event["status"],
                      event["items_complete"], event["items"])
        if event.get("status") == "deadline":
            self._timed_out(event)
        return self._result(event)
