"""The panel wait's trigger: fires on quorum, or at the deadline with the progress so far."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

from rlhf_airflow.triggers.panel import PanelQuorumTrigger
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
    assert path == "rlhf_airflow.triggers.panel.PanelQuorumTrigger"
    for item in store.items(batch):
        store.record_verdict(item["id"], "ann", True, source="import")
    event = _first_event(PanelQuorumTrigger(**kwargs))
    assert event["status"] == "quorum" and event["complete"] and event["items"] == 2
    store.dispose()


def test_trigger_fires_when_a_sequential_panel_has_decided(tmp_path):
    """Before quorum: the sequential panel closed its batch on the decision."""
    url = f"sqlite:///{tmp_path}/panel.db"
    store = PanelStore(url)
    batch = store.create_batch(pipeline="p", run_id="r", items=[
        {"prompt_index": i, "prompt": "q", "response": "a", "model": m}
        for i in range(40) for m in ("rlhf", "champion")],
        verdicts_per_item=3, quality_bar="bar", simulated=False,
        sequential={"candidate": "rlhf", "reference": "champion", "k": 3,
                    "significance": 0.05, "min_prompts": 5})
    later = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    for name in ("ann", "bob"):
        store.add_reviewer(name)
    models = {i["id"]: i["model"] for i in store.items(batch, with_model=True)}
    served = 0
    while (item := store.next_item(batch, "ann")) is not None:
        # the candidate is worse: both pass the champion's answers, fail the candidate's
        store.record_verdict(item.id, "ann", models[item.id] == "champion")
        twin = store.next_item(batch, "bob")
        store.record_verdict(twin.id, "bob", models[twin.id] == "champion")
        served += 2
    event = _first_event(PanelQuorumTrigger(url, batch, later, 0.05))
    assert event["status"] == "decided" and event["complete"]
    assert event["sequential"]["look"] == "futility"
    assert event["verdicts_given"] == served < 40 * 2 * 3
    store.dispose()


def test_trigger_retries_store_errors_with_backoff(tmp_path):
    """The store is unreachable at first (its folder does not exist yet): the trigger
    backs off and retries, and fires once the store is back and the batch has quorum."""
    from rlhf_airflow.triggers.panel import MAX_STORE_ERRORS, backoff

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
    import rlhf_airflow.triggers.panel as wait

    monkeypatch.setattr(wait, "MAX_STORE_ERRORS", 3)
    later = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    event = _first_event(PanelQuorumTrigger(f"sqlite:///{tmp_path}/no/such/dir/p.db", "b",
                                            later, 0.01))
    assert event["status"] == "error" and "unable to open database" in event["error"]


def _sensor_run(tmp_path, monkeypatch, *, judged: bool, deadline_hours: float = 72.0):
    """A run config (as ``load_run_config`` gives it), its evaluation record and batch."""
    import json

    import rlhf_airflow.run_config as run_config
    from rlhf_tasks import config

    url = f"sqlite:///{tmp_path}/panel.db"
    store = PanelStore(url)
    batch = store.create_batch(pipeline="p", run_id="r", items=[
        {"prompt_index": i, "prompt": "q", "response": "a", "model": "m"} for i in range(2)],
        verdicts_per_item=1, quality_bar="bar", simulated=False)
    if judged:
        for item in store.items(batch):
            store.record_verdict(item["id"], "ann", True, source="import")
    store.dispose()
    cfg = config.PipelineConfig.model_validate({
        "run": {"pipeline": "p", "run_id": "r"},
        "storage": {"artifact_root": str(tmp_path / "art")},
        "panel": {"mode": "human", "store_url": url, "deadline_hours": deadline_hours,
                  "review_url": "https://review.example.org/rlhf-review/"}})
    record = tmp_path / "art" / "p" / "r" / "evaluate" / "evaluate.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"batch_id": batch}))
    monkeypatch.setattr(run_config, "load_run_config", lambda context: cfg)
    return batch


def test_the_sensor_returns_on_quorum_with_the_review_page(tmp_path, monkeypatch):
    from rlhf_airflow.sensors.panel import PanelQuorumSensor
    from rlhf_airflow.links import ReviewPageLink

    _sensor_run(tmp_path, monkeypatch, judged=True)
    sensor = PanelQuorumSensor(task_id="wait_for_panel", soft_fail=True)
    result = sensor.execute({})
    assert result["status"] == "quorum" and result["complete"]
    assert result["review_url"] == "https://review.example.org/rlhf-review/"
    assert ReviewPageLink().get_link(sensor, ti_key=None) == result["review_url"]
    # the timeout defaults to the panel's deadline from the run's config
    assert sensor.deadline_seconds == 72 * 3600 and sensor.poll_interval == 60


def test_the_sensor_defers_and_times_out_at_the_deadline(tmp_path, monkeypatch):
    """Before quorum it defers to the trigger (with the deadline and a backstop timeout);
    the trigger's deadline event is a sensor timeout, which soft_fail turns into a skip
    (the gate then rejects); a store that kept failing fails the task even so."""
    import pytest
    from airflow.sdk.exceptions import (AirflowSensorTimeout, AirflowSkipException,
                                        TaskDeferred)

    from rlhf_airflow.sensors.panel import PanelQuorumSensor

    monkeypatch.setattr("rlhf_airflow.notifications.rlhf.review_waiting", lambda *a, **kw: None)
    _sensor_run(tmp_path, monkeypatch, judged=False)
    sensor = PanelQuorumSensor(task_id="wait_for_panel", soft_fail=True, poll_interval=5)
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute({})
    trigger = deferred.value.trigger
    assert isinstance(trigger, PanelQuorumTrigger) and trigger.poll_seconds == 5
    assert timedelta(hours=72) < deferred.value.timeout < timedelta(hours=72, minutes=2)

    event = {"status": "deadline", "items": 2, "items_complete": 0, "verdicts_given": 0}
    with pytest.raises(AirflowSensorTimeout, match="no quorum by the panel's deadline"):
        PanelQuorumSensor(task_id="w").execute_complete({}, event)
    soft = PanelQuorumSensor(task_id="w", soft_fail=True)
    with pytest.raises(AirflowSkipException):
        soft.resume_execution("execute_complete", {"event": event}, {})
    with pytest.raises(RuntimeError, match="kept failing"):
        soft.resume_execution("execute_complete",
                              {"event": {"status": "error", "error": "db gone"}}, {})


def test_the_sensor_pokes_when_not_deferrable(tmp_path, monkeypatch):
    from rlhf_airflow.sensors.panel import PanelQuorumSensor

    _sensor_run(tmp_path, monkeypatch, judged=True)
    sensor = PanelQuorumSensor(task_id="w", deferrable=False, mode="poke")
    sensor._prepare({})
    done = sensor.poke({})
    assert done.is_done and done.xcom_value["status"] == "quorum"


def test_the_gate_leaves_an_open_batch_alone_before_its_deadline(tmp_path, monkeypatch):
    """A wait marked successful by hand (or ended early) does not let the gate close the
    batch under its reviewers: without quorum, only the deadline closes it."""
    import pytest

    import rlhf_airflow.run_config as run_config
    from rlhf_tasks.errors import BadInput
    from rlhf_tasks.steps import panel

    batch = _sensor_run(tmp_path, monkeypatch, judged=False)
    cfg = run_config.load_run_config({})
    with pytest.raises(BadInput, match="the batch stays open"):
        panel.gate(cfg)
    store = PanelStore(cfg.panel.store_url)
    assert store.batch(batch).closed_at is None
    store.dispose()
