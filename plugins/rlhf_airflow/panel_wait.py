"""The expert-panel wait: a deferrable operator and its trigger.

``PanelQuorumSensor`` checks the verdict store once; when the batch still lacks verdicts
it defers to ``PanelQuorumTrigger``, which polls the store from the triggerer every
``panel.poll_seconds`` (no worker slot is held while people review) and fires on quorum
(every item has its k verdicts) or at the deadline (``panel.deadline_hours`` after the
batch was made).  The task then returns the batch's progress; the ``gate`` step decides.

A wait lasts days, so one database error must not end it: a store error (the database
restarting, a dropped connection) is logged and retried with exponential backoff (from
``poll_seconds``, doubling, at most ``MAX_BACKOFF_S``); only ``MAX_STORE_ERRORS`` errors in
a row end the wait with an error, which fails the task.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from typing import Any, AsyncIterator, Sequence

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException
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


class PanelQuorumSensor(BaseOperator):
    """Wait for the panel's verdicts on the run's review batch (deferrable)."""

    ui_color = "#fff3cd"

    def execute(self, context):
        from rlhf_airflow.run_config import load_run_config
        from rlhf_tasks.errors import BadInput
        from rlhf_tasks.panel.store import PanelStore, panel_store_url
        from rlhf_tasks.storage import Storage

        # the run's own config and batch (the evaluation's record in the run's folder),
        # never a config or batch id handed over in an XCom
        cfg = load_run_config(context)
        try:
            self.batch_id = Storage.from_config(cfg).read_json(
                cfg.step_uri("evaluate", "evaluate.json"))["batch_id"]
        except BadInput as exc:
            raise AirflowFailException(str(exc)) from None
        url = panel_store_url(cfg)
        store = PanelStore(url)
        try:
            batch = store.batch(self.batch_id)
            progress = store.progress(self.batch_id)
        finally:
            store.dispose()
        if progress["complete"]:
            return {"status": "quorum", **progress}
        created = batch.created_at if batch.created_at.tzinfo else \
            batch.created_at.replace(tzinfo=timezone.utc)
        deadline = created + timedelta(hours=cfg.panel.deadline_hours)
        self.log.info("waiting for the panel: %d of %d verdicts; deadline %s",
                      progress["verdicts_given"], progress["verdicts_needed"], deadline)
        if progress["verdicts_given"] == 0:  # the wait starts: tell the panel
            from rlhf_airflow.notify import review_waiting

            review_waiting(context, batch_id=self.batch_id, items=progress["items"],
                           verdicts_needed=progress["verdicts_needed"],
                           k=batch.verdicts_per_item, review_url=review_url(cfg),
                           deadline_hours=cfg.panel.deadline_hours)
        self.defer(trigger=PanelQuorumTrigger(url, self.batch_id, deadline.isoformat(),
                                              cfg.panel.poll_seconds),
                   method_name="execute_complete")

    def execute_complete(self, context, event: dict) -> dict:
        if event.get("status") == "error":
            raise AirflowException(f"the panel store kept failing: {event['error']}")
        self.log.info("panel %s: %d of %d items complete", event["status"],
                      event["items_complete"], event["items"])
        return event
