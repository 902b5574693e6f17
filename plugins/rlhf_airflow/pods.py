"""The pod a step runs in under ``compute.backend: kubernetes``: built from the run config.

``pod_settings(cfg, step, ...)`` returns the KubernetesPodOperator attributes for one
step; ``RlhfStepOperator`` applies them when the run asks for Kubernetes.  GPU steps
(reward, sft, ppo, evaluate) get ``nvidia.com/gpu`` limits, the GPU node selector and tolerations;
every pod gets a memory-backed ``/dev/shm``, its credentials from Kubernetes secrets
(``envFrom``; nothing secret passes through Params, XCom or logs), and writes its result
to ``/airflow/xcom/return.json`` for the XCom sidecar.  Several GPUs run the same argv
under ``accelerate launch`` with one process per GPU.
"""

from __future__ import annotations

from typing import Any

from rlhf_airflow.backends import step_argv
from rlhf_tasks.steps import GPU_STEPS
XCOM_RESULT = "/airflow/xcom/return.json"


def step_command(step: str, config_uri: str, overrides: list[str], gpus: int,
                 config_sha256: str | None = None) -> tuple[list[str], list[str]]:
    """(command, args) of the container: ``rlhf run ...``, or under accelerate for gpus > 1."""
    argv = step_argv(step, config_uri, overrides, XCOM_RESULT, config_sha256)
    if gpus > 1:
        return (["accelerate", "launch", "--multi_gpu", "--num_machines", "1",
                 "--num_processes", str(gpus), "-m", "rlhf_tasks.cli"], argv[1:])
    return [argv[0]], argv[1:]


def resources(kube, gpus: int, memory: str) -> tuple[dict[str, str], dict[str, str]]:
    """(requests, limits) of a trainer container: ``memory``, the CPU request, ``gpus``."""
    limits = {"memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    return {"cpu": kube.cpu, "memory": memory}, limits


def labels(cfg, step: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "rlhf-trainer", "rlhf/step": step,
            "rlhf/pipeline": cfg.run.pipeline}


def pod_settings(cfg, step: str, config_uri: str, overrides: list[str],
                 config_sha256: str | None = None) -> dict[str, Any]:
    from kubernetes.client import models as k8s

    kube = cfg.compute.kubernetes
    trainer = step in GPU_STEPS
    gpus = cfg.compute.num_gpus if trainer else 0
    cmds, arguments = step_command(step, config_uri, overrides, gpus, config_sha256)
    # a training step needs the trainer's memory on CPU nodes too (as its TrainJob gets)
    requests, limits = resources(kube, gpus, kube.memory if trainer else kube.cpu_step_memory)
    return {
        "name": f"rlhf-{step.replace('_', '-')}",
        "namespace": kube.namespace,
        "image": kube.image,
        "image_pull_policy": kube.image_pull_policy,
        "service_account_name": kube.service_account,
        "kubernetes_conn_id": kube.kubernetes_conn_id,
        "cmds": cmds,
        "arguments": arguments,
        "labels": labels(cfg, step),
        "container_resources": k8s.V1ResourceRequirements(requests=requests, limits=limits),
        "node_selector": dict(kube.node_selector) if gpus else None,
        "tolerations": [k8s.V1Toleration(**t) for t in kube.tolerations] if gpus else None,
        "volumes": [k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(
            medium="Memory", size_limit=kube.shm_size))],
        "volume_mounts": [k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")],
        "env_from": [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=name))
                     for name in kube.env_secrets],
        "env_vars": [k8s.V1EnvVar(name="PYTHONUNBUFFERED", value="1")],
        "on_finish_action": kube.on_finish_action,
        "startup_timeout_seconds": kube.startup_timeout_seconds,
        "logging_interval": kube.logging_interval,
    }
