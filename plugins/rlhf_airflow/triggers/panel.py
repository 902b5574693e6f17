"""``PanelQuorumTrigger``: polls the verdict store from the triggerer until a review batch
has quorum or its deadline passes.

A wait lasts days, so one database error must not end it: a store error (the database
restarting, a dropped connection) is logged and retried with exponential backoff (from
``poll_interval``, doubling, at most ``MAX_BACKOFF_S``); only ``MAX_STORE_ERRORS`` errors
in a row end the wait with an error event, which fails the task.  Events are keyed
``"status"``: ``quorum``, ``decided`` (a sequential panel settled its comparison),
``deadline`` or ``error``, with the batch's progress.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Any, AsyncIterator

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


def completion(progress: dict) -> str:
    """How a complete batch completed: ``decided`` (a sequential panel settled its
    comparison and closed the batch, before quorum) or ``quorum``."""
    return "decided" if progress.get("sequential") else "quorum"


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
                    yield TriggerEvent({"status": completion(progress), **progress})
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
