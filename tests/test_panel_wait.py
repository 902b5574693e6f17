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
        store.record_verdict(item["id"], "ann", True, source="import")
    event = _first_event(PanelQuorumTrigger(**kwargs))
    assert event["status"] == "quorum" and event["complete"] and event["items"] == 2
    store.dispose()


def test_trigger_retries_store_errors_with_backoff(tmp_path):
    """The store is unreachable at first (its folder does not exist yet): the trigger
    backs off and retries, and fires once the store is back and the batch has quorum."""
    from rlhf_airflow.panel_wait import MAX_STORE_ERRORS, backoff

    assert [backoff(n, 60) for n in (1, 2, 3)] == [60, 120, 240] and backoff(30, 60) == 900
    folder = tmp_path / "not-yet"
    url = f"sqlite:///{folder}/panel.db"
    later = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    trigger = PanelQuorumTrigger(url, "b", later, 0.02)

    async def scenario():
        events = trigger.run()
        waiting = asyncio.ensure_future(events.__anext__())
        for _ in range(1000):  # until the trigger has failed twice (bounded)
            if getattr(trigger, "errors", 0) >= 2 or waiting.done():
                break
            await asyncio.sleep(0.01)
        assert not waiting.done() and trigger.errors >= 2
        folder.mkdir()
        store = PanelStore(url)
        batch = store.create_batch(pipeline="p", run_id="r", items=[
            {"prompt_index": 0, "prompt": "q", "response": "a", "model": "m"}],
            verdicts_per_item=1, quality_bar="bar", simulated=False)
        store.record_verdict(store.items(batch)[0]["id"], "ann", True, source="import")
        store.dispose()
        trigger.batch_id = batch
        return (await asyncio.wait_for(waiting, timeout=60)).payload

    event = asyncio.run(scenario())
    assert event["status"] == "quorum" and trigger.errors == 0
    assert MAX_STORE_ERRORS > 2


def test_trigger_gives_up_after_many_store_errors_in_a_row(tmp_path, monkeypatch):
    import rlhf_airflow.panel_wait as wait

    monkeypatch.setattr(wait, "MAX_STORE_ERRORS", 3)
    later = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    event = _first_event(PanelQuorumTrigger(f"sqlite:///{tmp_path}/no/such/dir/p.db", "b",
                                            later, 0.01))
    assert event["status"] == "error" and "unable to open database" in event["error"]
