"""The pods the DAG's steps would run in (no cluster: the built V1Pod objects)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"), bundle_path=ROOT / "dags").dags["rlhf_tuning"]


def build_pod(dag, task_id: str, tmp_path, **compute):
    import copy

    import yaml

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"compute": {"backend": "kubernetes", **compute},
                                      "storage": {"artifact_root": "s3://bucket/rlhf"}}))
    task = dag.get_task(task_id)
    if task_id == "tune":  # mapped: one of its task instances, its step resolved to ppo
        op = task.unmap({"candidate": "ppo"})
        op.step = "ppo"
    else:
        op = copy.deepcopy(task)
    op.config_uri, op.backend = str(config), "kubernetes"
    op.overrides = ["tracking.parent_run_id=abc123"]
    op.configure_pod()
    return op, op.build_pod_request_obj(dry_run=True)


def main_container(pod):
    return next(c for c in pod.spec.containers if c.name == "base")


@pytest.mark.parametrize("task_id,step", [("reward", "reward"), ("tune", "ppo"), ("sft", "sft")])
def test_gpu_step_pod(dag, tmp_path, task_id, step):
    op, pod = build_pod(dag, task_id, tmp_path)
    c = main_container(pod)
    assert c.image == "ghcr.io/rlhf-airflow/trainer:0.1.0"
    assert c.command == ["rlhf"]
    assert c.args == ["run", step, "--config", op.config_uri, "--set",
                      "tracking.parent_run_id=abc123", "--result", "/airflow/xcom/return.json"]
    assert c.resources.limits == {"memory": "32Gi", "nvidia.com/gpu": "1"}
    assert c.resources.requests == {"cpu": "4", "memory": "32Gi"}
    assert pod.spec.node_selector == {"nvidia.com/gpu.present": "true"}
    assert [(t.key, t.operator, t.effect) for t in pod.spec.tolerations] == [
        ("nvidia.com/gpu", "Exists", "NoSchedule")]
    shm = next(v for v in pod.spec.volumes if v.name == "dshm")
    assert shm.empty_dir.medium == "Memory" and shm.empty_dir.size_limit == "16Gi"
    assert {(m.name, m.mount_path) for m in c.volume_mounts} == {("dshm", "/dev/shm"),
                                                                 ("xcom", "/airflow/xcom")}
    assert [e.secret_ref.name for e in c.env_from] == ["rlhf-s3", "rlhf-mlflow"]
    assert all("SECRET" not in (e.name or "") for e in c.env or [])
    assert pod.spec.service_account_name == "rlhf-trainer"
    assert pod.metadata.namespace == "rlhf"
    assert pod.metadata.labels["rlhf/step"] == step
    assert "airflow-xcom-sidecar" in [x.name for x in pod.spec.containers]
    assert op.deferrable and op.get_logs and op.logging_interval == 60
    assert op.on_finish_action.value == "delete_succeeded_pod"
    assert op.retries >= 1


def test_validation_runs_in_a_cpu_pod(dag, tmp_path):
    _, pod = build_pod(dag, "validate.preference", tmp_path)
    c = main_container(pod)
    assert c.resources.limits == {"memory": "8Gi"}
    assert pod.spec.node_selector is None and pod.spec.tolerations is None
    assert c.args[:2] == ["run", "validate_preference"]


def test_a_training_step_without_gpus_gets_the_trainer_memory_on_any_node(dag, tmp_path):
    _, pod = build_pod(dag, "tune", tmp_path, num_gpus=0)
    c = main_container(pod)
    assert c.resources.limits == {"memory": "32Gi"}
    assert c.resources.requests == {"cpu": "4", "memory": "32Gi"}
    assert pod.spec.node_selector is None and pod.spec.tolerations is None


def test_several_gpus_run_under_accelerate(dag, tmp_path):
    _, pod = build_pod(dag, "tune", tmp_path, num_gpus=4,
                       kubernetes={"on_finish_action": "keep_pod", "namespace": "ml"})
    c = main_container(pod)
    assert c.command == ["accelerate", "launch", "--multi_gpu", "--num_machines", "1",
                         "--num_processes", "4", "-m", "rlhf_tasks.cli"]
    assert c.args[:2] == ["run", "ppo"]
    assert c.resources.limits["nvidia.com/gpu"] == "4"
    assert pod.metadata.namespace == "ml"


def test_bookkeeping_steps_stay_on_the_worker(dag):
    for task_id in ("start_tracking", "finish_tracking", "abort_tracking"):
        assert dag.get_task(task_id).backend == "local"
    assert dag.get_task("reward").backend is None  # the run's pinned config decides


def test_pod_exit_code_2_fails_without_retry(dag):
    from airflow.sdk.exceptions import AirflowFailException
    from kubernetes.client import models as k8s

    op = dag.get_task("reward")

    def pod_exited(code):
        terminated = k8s.V1ContainerStateTerminated(exit_code=code)
        status = k8s.V1ContainerStatus(name="base", image="i", image_id="", ready=False,
                                       restart_count=0,
                                       state=k8s.V1ContainerState(terminated=terminated))
        return k8s.V1Pod(status=k8s.V1PodStatus(container_statuses=[status]))

    def fail():
        raise RuntimeError("Pod rlhf-reward returned a failure")

    op.pod = pod_exited(2)
    with pytest.raises(AirflowFailException, match="rejected its input"):
        op._fail_fast_on_bad_input(fail)
    op.pod = pod_exited(1)  # a fault: an ordinary error, so Airflow retries
    with pytest.raises(RuntimeError):
        op._fail_fast_on_bad_input(fail)
