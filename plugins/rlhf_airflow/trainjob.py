"""Several machines: a training step as a Kubeflow Trainer ``TrainJob``.

With ``compute.num_nodes > 1`` (``compute.backend: kubernetes``), the training steps
(reward, sft, ppo) run as a TrainJob on the admin's ClusterTrainingRuntime
(``compute.kubernetes.training_runtime``; ``docker/k8s/trainingruntime.yaml`` is a torch
runtime carrying the credential secrets).  Kubeflow Trainer starts ``num_nodes`` pods (a
JobSet), gives each torchrun's ``PET_*`` variables (nodes, processes per node, node 0's
address and port) and runs the container command on each: ``torchrun`` with the c10d
rendezvous at node 0, one process per GPU, every process the step's ``rlhf run`` argv.
Every process trains; the first writes the step's result to the run's artifact store
(``<run>/<step>/result-try<N>.json``: a TrainJob has no XCom sidecar), where the operator
reads it back.

* :func:`manifest` builds the object (tests validate it with the Trainer API's models);
* :func:`outcome` reads its status conditions;
* :class:`rlhf_airflow.triggers.trainjob.TrainJobTrigger` waits for it in the triggerer
  (no worker slot), waking the task every ``logging_interval`` seconds to copy node 0's
  new log lines into the task log; the operator (``operators/step.py``) creates the job,
  defers, and fails without retry when a node exited 2 (bad input or config).
"""

from __future__ import annotations

import hashlib
from typing import Any

from rlhf_airflow.backends import step_argv
from rlhf_airflow.pods import labels, resources
from rlhf_tasks.steps import TRAINING_STEPS

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
NODE = "node"  # the torch runtime's replicated job and trainer container
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"


def uses_trainjob(cfg, step: str) -> bool:
    return (cfg.compute.backend == "kubernetes" and cfg.compute.num_nodes > 1
            and step in TRAINING_STEPS)


def job_name(run_id: str, step: str, try_number: int) -> str:
    """One name per (run, step, try): a resumed task finds its job, a retry makes a new
    one.  Short enough for the JobSet's pod and service names built from it."""
    digest = hashlib.sha256(f"{run_id}/{step}/{try_number}".encode()).hexdigest()[:10]
    return f"rlhf-{step.replace('_', '-')}-{digest}"  # dr_grpo: no '_' in a DNS name


def result_uri(cfg, step: str, try_number: int) -> str:
    return cfg.step_uri(step, f"result-try{try_number}.json")


def torchrun_command(name: str) -> list[str]:
    """The node command: torchrun takes ``--nnodes`` and ``--nproc-per-node`` from the
    runtime's ``PET_NNODES`` / ``PET_NPROC_PER_NODE``; the c10d rendezvous at node 0
    (Kubernetes expands ``$(VAR)`` from the container's environment) assigns the ranks."""
    return ["torchrun", "--rdzv-backend=c10d",
            "--rdzv-endpoint=$(PET_MASTER_ADDR):$(PET_MASTER_PORT)", f"--rdzv-id={name}",
            "--module", "rlhf_tasks.cli"]


def manifest(cfg, step: str, config_uri: str, overrides: list[str], name: str,
             result: str, config_sha256: str | None = None) -> dict[str, Any]:
    kube, compute = cfg.compute.kubernetes, cfg.compute
    gpus = compute.num_gpus
    requests, limits = resources(kube, gpus, kube.memory)
    pod: dict[str, Any] = {
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory",
                                                   "sizeLimit": kube.shm_size}}],
        "containers": [{"name": NODE, "volumeMounts": [{"name": "dshm",
                                                          "mountPath": "/dev/shm"}]}],
    }
    if kube.service_account:
        pod["serviceAccountName"] = kube.service_account
    if gpus:
        pod["nodeSelector"] = dict(kube.node_selector)
        pod["tolerations"] = [dict(t) for t in kube.tolerations]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": kube.namespace,
                     "labels": labels(cfg, step)},
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": "ClusterTrainingRuntime",
                           "name": kube.training_runtime},
            # the cluster stops it too when the step's time is up
            "activeDeadlineSeconds": int(compute.step_timeout(step) * 3600),
            "trainer": {
                "image": kube.image,
                "command": torchrun_command(name),
                "args": step_argv(step, config_uri, overrides, result, config_sha256)[1:],
                "numNodes": compute.num_nodes,
                "numProcPerNode": max(1, gpus),
                "resourcesPerNode": {"requests": requests, "limits": limits},
                "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
            },
            "runtimePatches": [{
                "manager": "rlhf-airflow",
                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
                    "name": NODE, "template": {"spec": {"template": {"spec": pod}}}}]}}},
            }],
        },
    }


def outcome(obj: dict) -> tuple[str, str]:
    """``("running" | "succeeded" | "failed", reason)`` from the TrainJob's conditions."""
    conditions = {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or []}
    for kind, state in (("Failed", "failed"), ("Complete", "succeeded")):
        condition = conditions.get(kind)
        if condition and condition.get("status") == "True":
            reason = ": ".join(filter(None, (condition.get("reason"),
                                             condition.get("message"))))
            return state, reason
    return "running", ""


def node_exit_codes(pods: list) -> dict[int, int]:
    """{node index: exit code} of the trainer containers that ended (V1Pod objects)."""
    codes = {}
    for pod in pods:
        index = int((pod.metadata.labels or {}).get(INDEX_LABEL, -1))
        for status in (pod.status and pod.status.container_statuses) or []:
            if status.name == NODE and status.state and status.state.terminated:
                codes[index] = status.state.terminated.exit_code
    return codes
