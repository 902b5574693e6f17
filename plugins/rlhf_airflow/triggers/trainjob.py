"""``TrainJobTrigger``: waits in the triggerer for a Kubeflow Trainer TrainJob (see
:mod:`rlhf_airflow.trainjob`)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

from airflow.triggers.base import BaseTrigger, TriggerEvent

from rlhf_airflow.trainjob import GROUP, PLURAL, VERSION, outcome


class TrainJobTrigger(BaseTrigger):
    """Polls one TrainJob until it ends, or ``wake_after`` seconds passed (the task then
    copies the new log lines and defers again).

    :param name: the TrainJob's name.
    :param namespace: its namespace.
    :param conn_id: the Kubernetes connection (None: in-cluster or the default config).
    :param poll_interval: seconds between reads of the TrainJob.
    :param wake_after: seconds after which the task is woken while the job still runs.
    :param logs_since: epoch seconds from which the task copies node 0's log.

    Events are keyed ``"status"``: ``running``, ``succeeded``, ``failed`` or ``error``
    (the API unreachable), with ``reason`` and ``logs_since``."""

    def __init__(self, name: str, namespace: str, conn_id: str | None,
                 poll_interval: float = 10.0, wake_after: float = 60.0,
                 logs_since: float | None = None):
        super().__init__()
        self.name, self.namespace, self.conn_id = name, namespace, conn_id
        self.poll_interval, self.wake_after = poll_interval, wake_after
        self.logs_since = logs_since if logs_since is not None else time.time()

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}", {
            "name": self.name, "namespace": self.namespace, "conn_id": self.conn_id,
            "poll_interval": self.poll_interval, "wake_after": self.wake_after,
            "logs_since": self.logs_since})

    async def _read(self) -> dict:
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import AsyncKubernetesHook
        from kubernetes_asyncio.client import CustomObjectsApi

        hook = AsyncKubernetesHook(conn_id=self.conn_id)
        async with hook.get_conn() as api:
            return await CustomObjectsApi(api).get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, self.name)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        started = time.monotonic()
        while True:
            try:
                state, reason = outcome(await self._read())
            except Exception as exc:  # the API unreachable: the task decides (retry)
                yield TriggerEvent({"name": self.name, "status": "error",
                                    "reason": f"{type(exc).__name__}: {exc}",
                                    "logs_since": self.logs_since})
                return
            if state != "running" or time.monotonic() - started >= self.wake_after:
                yield TriggerEvent({"name": self.name, "status": state, "reason": reason,
                                    "logs_since": self.logs_since})
                return
            await asyncio.sleep(self.poll_interval)
