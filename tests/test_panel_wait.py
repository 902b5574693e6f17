"""The panel wait's trigger: fires on quorum, or at the deadline with the progress so far."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

from rlhf_airflow.panel_wait import PanelQuorumTrigger
from rlhf_tasks.panel.store import PanelStore


def _first_event(trigger):
    async def first():
        async for event in trigger.run():
            return event.payload

    return asyncio.run(asyncio.wait_for(first(), timeout=30))


def test_trigger_fires_on_quorum_and_at_the_deadline(tmp_path):
    url = f"sqlite:///{tmp_path}/panel.db"
    store = PanelStore(url)
    batch = store.create_batch(pipeline="p", run_id="r", items=[
        {"prompt_index": i, "prompt": "q", "response": "a", "model": "m"} for i in range(2)],
        verdicts_per_item=1, quality_bar="bar", simulated=False)
    past = (datetime.now(timezone.utc) - timedelta(seconds=1)).isoformat()
    later = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    event = _first_event(PanelQuorumTrigger(url, batch, past, 0.05))
    assert event["status"] == "deadline" and event["verdicts_given"] == 0
    # serialisable for the triggerer, and round-trips
    path, kwargs = PanelQuorumTrigger(url, batch, later, 0.05).serialize()
    assert path == "rlhf_airflow.panel_wait.PanelQuorumTrigger"
    for item in store.items(batch):
        store.record_verdict(item["id"], "ann", True)
    event = _first_event(PanelQuorumTrigger(**kwargs))
    assert event["status"] == "quorum" and event["complete"] and event["items"] == 2
    store.dispose()
