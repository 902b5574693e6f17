"""Deploy the new champion: a template for a team's own deployment.

Scheduled on the ``rlhf-champion`` Asset, which ``rlhf_tuning``'s ``promote`` task
updates when it moves the ``champion`` alias (the event's extra names the model and the
version).  This DAG loads the registry's champion as an MLflow model, the way a serving
system would, and smoke-tests it on a few eval prompts of the run that produced it.

Replace ``smoke_test``'s downstream with your own rollout: push the model to your serving
platform (``mlflow models build-docker``, a KServe InferenceService, a SageMaker
endpoint), shift traffic, watch.  The config is the admin's base config
(``$RLHF_BASE_CONFIG``); the Asset event's extra is logged, never trusted.
"""

from __future__ import annotations

import os
from datetime import datetime

from airflow.sdk import DAG, task

from rlhf_airflow.operators.step import RlhfStepOperator
from rlhf_airflow.scheduling import CHAMPION_ASSET, GPU_QUEUE

with DAG(
    dag_id="rlhf_deploy_champion",
    description="Smoke-test the newly promoted champion (deployment template).",
    schedule=[CHAMPION_ASSET],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["rlhf", "deploy"],
    doc_md=__doc__,
) as dag:

    @task
    def announced(triggering_asset_events=None) -> dict:
        """What the promotion announced (for the log: the smoke test asks the registry)."""
        extras = [event.extra for events in (triggering_asset_events or {}).values()
                  for event in events]
        print(f"champion announced: {extras}")
        return extras[-1] if extras else {}

    smoke = RlhfStepOperator(task_id="smoke_test", step="smoke_test",
                             config_uri=os.environ.get("RLHF_BASE_CONFIG", ""), retries=1,
                             queue=GPU_QUEUE,
                             doc_md="Load the champion through MLflow and ask it a few "
                                    "eval prompts.")
    announced() >> smoke
