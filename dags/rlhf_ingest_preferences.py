"""Announce new preference data: an Asset event when the dataset's content changed.

Run it after the upstream export writes the file (trigger it from that job, or give it a
schedule), or replace it with an external event (the REST API, an AssetWatcher).  When
the base config says ``schedule.on_new_preferences: true``, ``rlhf_tuning`` retrains on
each event.  Unchanged content emits no event (the task is skipped), so re-running is safe.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, task

from rlhf_airflow.scheduling import base_config, fingerprint, preference_asset

PREFERENCES = preference_asset(base_config())

with DAG(
    dag_id="rlhf_ingest_preferences",
    description="Emit the preference dataset's Asset event when its content changed.",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["rlhf", "data"],
    doc_md=__doc__,
) as dag:

    @task(inlets=[PREFERENCES] if PREFERENCES else [],
          outlets=[PREFERENCES] if PREFERENCES else [])
    def publish_if_changed(inlet_events=None, outlet_events=None) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        if PREFERENCES is None:
            raise AirflowSkipException("no base config with data.preference_uri "
                                       "($RLHF_BASE_CONFIG): nothing to announce")
        cfg = base_config()
        current = fingerprint(cfg)
        events = inlet_events[PREFERENCES]
        last = events[-1].extra.get("sha256") if len(events) else None
        if current["sha256"] == last:
            raise AirflowSkipException(f"preference data unchanged (sha256 {last[:12]})")
        outlet_events[PREFERENCES].extra = current
        return current

    publish_if_changed()
