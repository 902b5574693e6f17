"""RLHF tuning pipeline: validate -> (reward -> PPO -> evaluate -> panel -> gate, to come).

A thin DAG: the stage graph and the trigger form.  Every heavy step is an
``RlhfStepOperator`` running ``rlhf run STEP`` on the backend chosen in the form; this file
imports no torch, transformers, trl or great_expectations (a test guards that).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, TaskGroup, TriggerRule, task

from rlhf_airflow.operators import RlhfStepOperator
from rlhf_airflow.params import trigger_params

CONFIG = "{{ ti.xcom_pull(task_ids='prepare_run')['config_uri'] }}"
BACKEND = "{{ ti.xcom_pull(task_ids='prepare_run')['backend'] }}"
PARENT = ("tracking.parent_run_id="
          "{{ (ti.xcom_pull(task_ids='start_tracking') or {}).get('parent_run_id', '') }}")

with DAG(
    dag_id="rlhf_tuning",
    description="Validate data, train a reward model, tune with PPO, gate on an expert panel.",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params=trigger_params(),
    default_args={"retries": 1, "retry_delay": timedelta(seconds=30)},
    tags=["rlhf", "llm"],
    doc_md=__doc__,
) as dag:

    @task(retries=0)
    def prepare_run(params=None, dag_run=None) -> dict:
        from rlhf_airflow.run_setup import prepare_run as build

        return build(dict(params), dag_run.dag_id, dag_run.run_id)

    prepared = prepare_run()
    start = RlhfStepOperator(task_id="start_tracking", step="start", config_uri=CONFIG,
                             backend=BACKEND)

    with TaskGroup("validate", tooltip="Great Expectations suites per dataset") as validate:
        for kind in ("preference", "prompt", "eval"):
            RlhfStepOperator(task_id=kind, step=f"validate_{kind}", config_uri=CONFIG,
                             overrides=[PARENT], backend=BACKEND)

    finish = RlhfStepOperator(task_id="finish_tracking", step="finish", config_uri=CONFIG,
                              overrides=[PARENT], backend=BACKEND)
    abort = RlhfStepOperator(task_id="abort_tracking", step="abort", config_uri=CONFIG,
                             overrides=[PARENT], backend=BACKEND,
                             trigger_rule=TriggerRule.ONE_FAILED, retries=0)

    prepared >> start >> validate >> [finish, abort]
