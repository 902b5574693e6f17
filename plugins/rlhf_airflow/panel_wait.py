"""The expert-panel wait: a deferrable sensor, its trigger, and its "Review page" link.

``PanelQuorumSensor`` checks the verdict store once; when the batch still lacks verdicts
it defers to ``PanelQuorumTrigger``, which polls the store from the triggerer every
``panel.poll_seconds`` (no worker slot is held while people review) and fires on quorum
(every item has its k verdicts) or at the deadline (``panel.deadline_hours`` after the
batch was made).  On quorum the task returns the batch's progress; at the deadline it
times out as sensors do (``soft_fail``: skipped), and the ``gate`` step rejects.

A wait lasts days, so one database error must not end it: a store error (the database
restarting, a dropped connection) is logged and retried with exponential backoff (from
``poll_seconds``, doubling, at most ``MAX_BACKOFF_S``); only ``MAX_STORE_ERRORS`` errors in
a row end the wait with an error, which fails the task.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from typing import Any, AsyncIterator, Sequence

from airflow.sdk import BaseOperatorLink, BaseSensorOperator, PokeReturnValue
from airflow.sdk.exceptions import AirflowFailException, AirflowSensorTimeout
from airflow.triggers.base import BaseTrigger, TriggerEvent

MAX_BACKOFF_S = 900.0
MAX_STORE_ERRORS = 12


def transient(exc: BaseException) -> bool:
    """Errors of the store a retry may cure: the database's own (SQLAlchemy's
    OperationalError, InterfaceError, a dropped connection) and the network's."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    return isinstance(exc, (OperationalError, OSError)) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated)


def backoff(errors: int, base: float) -> float:
    return min(MAX_BACKOFF_S, max(base, 0.01) * 2 ** (errors - 1))


class PanelQuorumTrigger(BaseTrigger):
    def __init__(self, store_url: str, batch_id: str, deadline: str, poll_seconds: float):
        super().__init__()
        self.store_url, self.batch_id = store_url, batch_id
        self.deadline, self.poll_seconds = deadline, poll_seconds

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"store_url": self.store_url, "batch_id": self.batch_id,
                 "deadline": self.deadline, "poll_seconds": self.poll_seconds})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from rlhf_tasks.panel.store import PanelStore

        deadline = datetime.fromisoformat(self.deadline)
        store = None
        self.errors = 0  # store errors in a row
        try:
            while True:
                try:
                    # one store (engine, pool) for the whole wait, not one per poll
                    if store is None:
                        store = await asyncio.to_thread(PanelStore, self.store_url)
                    progress = await asyncio.to_thread(store.progress, self.batch_id)
                except Exception as exc:  # noqa: BLE001 - classified below
                    if not transient(exc):
                        raise
                    self.errors += 1
                    if self.errors >= MAX_STORE_ERRORS:
                        yield TriggerEvent({"status": "error", "error": str(exc)[:2000]})
                        return
                    delay = backoff(self.errors, self.poll_seconds)
                    self.log.warning("panel store error %d of at most %d in a row, retrying in "
                                     "%.0f s: %s", self.errors, MAX_STORE_ERRORS, delay,
                                     str(exc).splitlines()[0][:300])
                    await asyncio.sleep(delay)
                    continue
                self.errors = 0
                if progress["complete"]:
                    yield TriggerEvent({"status": "quorum", **progress})
                    return
                if datetime.now(timezone.utc) >= deadline:
                    yield TriggerEvent({"status": "deadline", **progress})
                    return
                self.log.info("panel batch %s: %d of %d verdicts", self.batch_id,
                              progress["verdicts_given"], progress["verdicts_needed"])
                await asyncio.sleep(self.poll_seconds)
        finally:
            if store is not None:
                store.dispose()


def review_url(cfg) -> str:
    """Where reviewers judge: ``panel.review_url``, else the page inside Airflow."""
    if cfg.panel.review_url:
        return cfg.panel.review_url
    from airflow.sdk import conf

    from rlhf_airflow.review_app import URL_PREFIX

    base = conf.get("api", "base_url", fallback="") or "http://localhost:8080"
    return base.rstrip("/") + URL_PREFIX + "/"


class ReviewPageLink(BaseOperatorLink):
    """The "Review page" button of the panel wait: where the reviewers judge the batch."""

    name = "Review page"

    def get_link(self, operator, *, ti_key) -> str:
        return getattr(operator, "review_page_url", None) or ""


class PanelQuorumSensor(BaseSensorOperator):
    """Wait until every item of the run's review batch has its k verdicts.

    The run's own config (``load_run_config``) names the store, the batch (the evaluation's
    record in the run's folder, never an id handed over in an XCom), the deadline and the
    poll interval; the task's result is the batch's progress with ``status`` (``quorum``)
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

        store = PanelStore(self.store_url)
        try:
            batch = store.batch(self.batch_id)
            progress = store.progress(self.batch_id)
        finally:
            store.dispose()
        created = batch.created_at if batch.created_at.tzinfo else \
            batch.created_at.replace(tzinfo=timezone.utc)
        return progress, created + timedelta(seconds=self.deadline_seconds), \
            batch.verdicts_per_item

    def _result(self, progress: dict) -> dict:
        return {**progress, "status": "quorum", "review_url": self.review_page_url}

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
            from rlhf_airflow.notify import review_waiting

            review_waiting(context, batch_id=self.batch_id, items=progress["items"],
                           verdicts_needed=progress["verdicts_needed"], k=k,
                           review_url=self.review_page_url,
                           deadline_hours=cfg.panel.deadline_hours)
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
