"""RLHF tuning pipeline: validate -> reward model -> tune (+ optional SFT baseline)
-> evaluate -> expert panel -> gate -> (sign-off) -> promote.

``tune`` trains the run's candidate (RL: PPO, RLOO, GRPO or Dr. GRPO; or DPO), one mapped
task per algorithm when ``tuning.algorithms`` names several (a bake-off): all of them are
judged in one blinded batch, and the gate promotes the best that passes.

The panel is simulated rubric raters (demo) or people on the review page (human mode:
the run waits, deferred, for quorum or the deadline).  The gate registers the candidate
in MLflow and decides; ``promote`` moves the ``champion`` alias.

A thin DAG: the stage graph and the trigger form.  Every heavy step is an
``RlhfStepOperator`` running ``rlhf run STEP`` on the backend chosen in the form; this file
imports no torch, transformers, trl or great_expectations (a test guards that).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, TaskGroup, TriggerRule, task

from rlhf_airflow.notifications.rlhf import LINKS, PASS_RATES, run_failed, sign_off_waiting
from rlhf_airflow.notifications.rlhf import gate_decision as gate_decided
from rlhf_airflow.operators.step import (CANDIDATE_STEP, RlhfStepOperator, placement,
                                         step_timeout)
from rlhf_airflow.sensors.panel import PanelQuorumSensor
from rlhf_airflow.params import trigger_params
from rlhf_airflow.run_note import write_gate_headline
from rlhf_airflow.scheduling import CHAMPION_ASSET, base_config, limits, retraining_schedule
from rlhf_airflow.operators.sign_off import SignOffOperator

# GPU steps take the GPU queue and the `gpu` pool by themselves (RlhfStepOperator:
# rlhf_airflow.operators.placement); the run's deadline alert comes from the base config
BASE = base_config()
LIMITS = limits(BASE)

with DAG(
    dag_id="rlhf_tuning",
    description="Validate data, train a reward model, tune (RL or DPO; a bake-off of several), "
                "gate on an expert panel.",
    # retraining: schedule.cron and/or new preference data (see rlhf_airflow/scheduling.py)
    schedule=retraining_schedule(BASE),
    deadline=LIMITS["deadline"],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params=trigger_params(),
    # a task's final failure is the run's: notify (the rlhf_notifications connection)
    default_args={"retries": 1, "retry_delay": timedelta(seconds=30),
                  "on_failure_callback": [run_failed()]},
    tags=["rlhf", "llm"],
    doc_md=__doc__,
) as dag:

    @task(retries=0)
    def prepare_run(params=None, dag_run=None) -> dict:
        from rlhf_airflow.run_setup import prepare_run as build

        return build(dict(params), dag_run.dag_id, dag_run.run_id, conf=dag_run.conf or {},
                     triggered_by=getattr(dag_run, "triggering_user_name", None))

    prepared = prepare_run()
    # bookkeeping steps are light: they always run on the worker (backend "local"); the
    # others run on the backend the run's config names.  Every step logs under the
    # pipeline's MLflow parent run, which start_tracking finds or creates (an XComArg)
    start = RlhfStepOperator(task_id="start_tracking", step="start", backend="local")
    parent = start.output  # {"parent_run_id": ...}

    with TaskGroup("validate", tooltip="Great Expectations suites per dataset") as validate:
        checks = [RlhfStepOperator(task_id=kind, step=f"validate_{kind}",
                                   parent_run=parent)
                  for kind in ("preference", "prompt", "eval")]

        # the supervised baseline runs only when the form (or the base config) asks for
        # it; skipping it skips its validation and training, nothing else
        @task.short_circuit(ignore_downstream_trigger_rules=False)
        def sft_enabled(**context) -> bool:
            from rlhf_airflow.run_config import load_run_config

            return load_run_config(context).sft.enabled

        validate_sft = RlhfStepOperator(task_id="sft", step="validate_sft",
                                        parent_run=parent)
        sft_enabled() >> validate_sft

    # ids without the group's prefix: other tasks, mails and users refer to them by name
    with TaskGroup("training", prefix_group_id=False,
                   tooltip="Reward model, SFT baseline, the candidates (GPU pool)") as training:
        reward = RlhfStepOperator(
            task_id="reward", step="reward", parent_run=parent,
            doc_md="TRL RewardTrainer + LoRA on the validated preferences.")
        sft = RlhfStepOperator(task_id="sft", step="sft", parent_run=parent,
                               doc_md="TRL SFTTrainer + LoRA: the baseline.")
        @task(retries=0)
        def candidates(**context) -> list[str]:
            """One training task per candidate (``tuning.algorithms``; one for a run's one
            candidate), by algorithm."""
            from rlhf_airflow.run_config import load_run_config

            return [c.algorithm for c in load_run_config(context).candidates]

        # RL (and DPO) start from the SFT policy when the run trains one (ppo.init_from):
        # they wait for SFT when it runs, and not when it is skipped.  The task's step
        # (ppo or dpo) is read off the run's config at run time
        tune = RlhfStepOperator.partial(
            task_id="tune", step=CANDIDATE_STEP, parent_run=parent,
            trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS,
            execution_timeout=max(step_timeout("ppo"), step_timeout("dpo")),
            **placement("ppo"),
            doc_md="Tune a candidate: the project's RL (ppo, rloo, grpo, dr_grpo) against the "
                   "reward model, or DPO on the pairs; one mapped task per algorithm of a "
                   "bake-off.").expand(candidate=(named := candidates()))
        prepared >> named  # the run's config exists from prepare_run on
        [reward, sft] >> tune

    with TaskGroup("panel", prefix_group_id=False,
                   tooltip="Blinded answers, the expert panel's verdicts") as panel:
        # evaluation waits for the SFT baseline when it runs (and not when it is skipped)
        evaluate = RlhfStepOperator(
            task_id="evaluate", step="evaluate", parent_run=parent,
            trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS,
            doc_md="Every model answers the eval prompts; blinded batch.")

        @task.short_circuit(ignore_downstream_trigger_rules=False)
        def simulated_panel(**context) -> bool:
            from rlhf_airflow.run_config import load_run_config

            return load_run_config(context).panel.mode == "simulated"

        panel_simulate = RlhfStepOperator(
            task_id="panel_simulate", step="panel_simulate", parent_run=parent,
            doc_md="Rubric raters (labelled simulated) judge the batch.")
        wait_for_panel = PanelQuorumSensor(
            task_id="wait_for_panel", retries=0, soft_fail=True,
            trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS,
            doc_md="Deferred until every item has its k verdicts; skipped at the deadline.")
        evaluate >> simulated_panel() >> panel_simulate
        [evaluate, panel_simulate] >> wait_for_panel

    with TaskGroup("release", prefix_group_id=False,
                   tooltip="Gate, sign-off, promotion") as release:
        # after a wait skipped at the deadline the gate still runs: it closes the batch and
        # rejects (the panel has not spoken)
        gate = RlhfStepOperator(task_id="gate", step="gate", parent_run=parent,
                                trigger_rule=TriggerRule.NONE_FAILED,
                                on_success_callback=[gate_decided(), write_gate_headline],
                                doc_md="Aggregate, report, register, and decide by the policy.")

        @task.branch
        def gate_decision(result: dict) -> list[str]:
            if result["decision"] != "promote":
                return []  # rejected: the version is tagged with the reason, no alias moves
            return ["sign_off"] if result["needs_sign_off"] else ["promote"]

        sign_off = SignOffOperator(
            task_id="sign_off",
            subject="Promote RLHF version {{ ti.xcom_pull(task_ids='gate')['version'] }}?",
            body="Expert pass rates: " + PASS_RATES + ".\n\n" + LINKS,
            # on an Approve it promotes, with the approver's id from Airflow's record
            outlets=[CHAMPION_ASSET],
            notifiers=[sign_off_waiting()], retries=1)  # a lost answer is asked for again
        promote = RlhfStepOperator(
            task_id="promote", step="promote", backend="local", parent_run=parent,
            retries=0, outlets=[CHAMPION_ASSET],
            trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS,
            doc_md="Alias champion moves here (runs that need no sign-off; sign_off promotes "
                   "the others); the old one keeps previous.")
        gate_decision(gate.output) >> [sign_off, promote]

    finish = RlhfStepOperator(task_id="finish_tracking", step="finish", backend="local",
                              parent_run=parent,
                              trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    abort = RlhfStepOperator(task_id="abort_tracking", step="abort", backend="local",
                             parent_run=parent,
                             trigger_rule=TriggerRule.ONE_FAILED, retries=0)

    prepared >> start >> validate
    checks >> reward
    validate_sft >> sft
    [tune, sft] >> evaluate
    wait_for_panel >> gate
    [gate, sign_off, promote] >> finish
    [*checks, validate_sft, reward, tune, sft, evaluate, panel_simulate, wait_for_panel, gate,
     sign_off, promote] >> abort
