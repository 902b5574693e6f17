"""Several nodes on Kubernetes: a training step as a Kubeflow Trainer TrainJob.

No cluster here: the manifest is validated against the Trainer API's own models
(``kubeflow-trainer-api``), and the operator and its trigger talk HTTP, through the
provider's hooks and the real Kubernetes clients, to a stand-in API server started by the
test that serves the few paths a TrainJob's life needs (create, read, delete; node pods;
node 0's log).  The two-node torchrun run of the TrainJob's command is in
``test_training.py::test_two_nodes_run_the_ppo_step_to_the_end``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path, **compute):
    from rlhf_tasks import config

    raw = {"compute": {"backend": "kubernetes", "num_nodes": 2, "num_gpus": 8, **compute},
           "storage": {"artifact_root": str(tmp_path / "artifacts")}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return config.load(str(path)), str(path)


def test_the_manifest_is_a_trainjob_of_the_trainer_api(tmp_path):
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    from rlhf_airflow import trainjob

    cfg, path = _config(tmp_path)
    name = trainjob.job_name("manual__1", "ppo", 1)
    body = trainjob.manifest(cfg, "ppo", path, ["tracking.parent_run_id=abc"], name,
                             trainjob.result_uri(cfg, "ppo", 1))
    # the Trainer API's models take it whole: nothing misspelled, nothing dropped
    assert TrainerV1alpha1TrainJob.from_dict(body).to_dict() == body
    spec = body["spec"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org",
                                  "kind": "ClusterTrainingRuntime",
                                  "name": "rlhf-torch-distributed"}
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 8
    assert trainer["command"] == [
        "torchrun", "--rdzv-backend=c10d",
        "--rdzv-endpoint=$(PET_MASTER_ADDR):$(PET_MASTER_PORT)", f"--rdzv-id={name}",
        "--module", "rlhf_tasks.cli"]
    assert trainer["args"] == ["run", "ppo", "--config", path, "--set",
                               "tracking.parent_run_id=abc", "--result",
                               cfg.step_uri("ppo", "result-try1.json")]
    assert trainer["resourcesPerNode"]["limits"] == {"memory": "32Gi", "nvidia.com/gpu": "8"}
    assert spec["activeDeadlineSeconds"] == 24 * 3600
    pod = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"][
        "replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["serviceAccountName"] == "rlhf-trainer"
    assert pod["volumes"][0]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    # a name per (run, step, try), valid as a DNS label with room for the JobSet's suffixes
    assert re.fullmatch(r"rlhf-ppo-[0-9a-f]{10}", name)
    assert trainjob.job_name("manual__1", "ppo", 2) != name


def test_the_shipped_runtime_gives_the_nodes_the_configured_secrets():
    """docker/k8s/trainingruntime.yaml: the runtime the config names by default, a torch
    runtime whose trainer container is ``node`` and reads the default ``env_secrets``."""
    from kubeflow_trainer_api.models import TrainerV1alpha1ClusterTrainingRuntime

    from rlhf_tasks.config import KubernetesSection

    runtime = yaml.safe_load((ROOT / "docker/k8s/trainingruntime.yaml").read_text())
    assert TrainerV1alpha1ClusterTrainingRuntime.from_dict(runtime).to_dict() == runtime
    kube = KubernetesSection()
    assert runtime["metadata"]["name"] == kube.training_runtime
    assert "torch" in runtime["spec"]["mlPolicy"]
    job = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]
    container = job["template"]["spec"]["template"]["spec"]["containers"][0]
    assert job["name"] == container["name"] == "node"
    assert [e["secretRef"]["name"] for e in container["envFrom"]] == kube.env_secrets


def test_several_nodes_need_kubernetes(tmp_path):
    from rlhf_tasks import config
    from rlhf_tasks.errors import BadInput

    with pytest.raises(BadInput, match="compute.backend: kubernetes"):
        config.validate({"compute": {"num_nodes": 2}})


def test_outcome_reads_the_conditions():
    from rlhf_airflow.trainjob import outcome

    assert outcome({}) == ("running", "")
    assert outcome({"status": {"conditions": [
        {"type": "Suspended", "status": "False"}]}}) == ("running", "")
    assert outcome({"status": {"conditions": [
        {"type": "Complete", "status": "True", "reason": "JobsCompleted"}]}}) == \
        ("succeeded", "JobsCompleted")
    assert outcome({"status": {"conditions": [
        {"type": "Complete", "status": "False"},
        {"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
         "message": "past activeDeadlineSeconds"}]}}) == \
        ("failed", "DeadlineExceeded: past activeDeadlineSeconds")


# -- the operator and trigger over HTTP ------------------------------------------------------
class FakeKubernetes:
    """What the stand-in API server holds: the TrainJobs, the conditions to report, and
    the node pods (exit codes) and node 0's log."""

    def __init__(self):
        self.jobs: dict[str, dict] = {}
        self.deleted: list[str] = []
        self.conditions: list[dict] = []
        self.exit_codes = {0: None, 1: None}
        self.log = "update 1/3 reward 0.1\nupdate 2/3 reward 0.2\n"
        self.log_requests: list[dict] = []


def _handler(state: FakeKubernetes):
    jobs_path = re.compile(r"/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)"
                           r"/trainjobs(?:/([^/]+))?$")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, code: int, body, content_type="application/json"):
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            match = jobs_path.match(urlparse(self.path).path)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            name = body["metadata"]["name"]
            if match is None:
                return self._send(404, {"kind": "Status", "code": 404})
            if name in state.jobs:
                return self._send(409, {"kind": "Status", "code": 409, "reason": "AlreadyExists"})
            state.jobs[name] = body
            return self._send(201, body)

        def do_GET(self):
            url = urlparse(self.path)
            if match := jobs_path.match(url.path):
                job = state.jobs.get(match.group(2))
                if job is None:
                    return self._send(404, {"kind": "Status", "code": 404})
                return self._send(200, {**job, "status": {"conditions": state.conditions}})
            if url.path.endswith("/log"):
                state.log_requests.append({"pod": url.path.split("/")[-2],
                                           **parse_qs(url.query)})
                return self._send(200, state.log, "text/plain")
            if url.path.endswith("/pods"):
                selector = parse_qs(url.query)["labelSelector"][0]
                name = selector.split("=", 1)[1]
                return self._send(200, {"kind": "PodList", "apiVersion": "v1", "items": [
                    _pod(name, index, code) for index, code in state.exit_codes.items()]})
            return self._send(404, {"kind": "Status", "code": 404})

        def do_DELETE(self):
            match = jobs_path.match(urlparse(self.path).path)
            state.deleted.append(match.group(2))
            return self._send(200, {"kind": "Status", "status": "Success"})

    return Handler


def _pod(job: str, index: int, code: int | None) -> dict:
    state = {"terminated": {"exitCode": code}} if code is not None else {"running": {}}
    return {"metadata": {"name": f"{job}-node-0-{index}", "labels": {
                "jobset.sigs.k8s.io/jobset-name": job,
                "batch.kubernetes.io/job-completion-index": str(index)}},
            "status": {"containerStatuses": [{
                "name": "node", "state": state, "ready": False, "restartCount": 0,
                "image": "trainer", "imageID": ""}]}}


@contextlib.contextmanager
def fake_kubernetes(tmp_path, monkeypatch):
    state = FakeKubernetes()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {
            "server": f"http://127.0.0.1:{server.server_address[1]}"}}],
        "users": [{"name": "test", "user": {"token": "t"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}]}))
    monkeypatch.setenv("AIRFLOW_CONN_RLHF_K8S", json.dumps({
        "conn_type": "kubernetes", "extra": {"kube_config_path": str(kubeconfig)}}))
    try:
        yield state
    finally:
        server.shutdown()


class _TI:
    try_number = 1


class _TaskLog:
    """The operator's task log, as lines (whatever the test session did to logging)."""

    def __init__(self):
        self.lines: list[str] = []

    def info(self, message, *args, **_):
        self.lines.append(message % args if args else message)

    debug = warning = error = info


def _operator(tmp_path, **kube):
    from rlhf_airflow.operators.step import RlhfStepOperator

    cfg, path = _config(tmp_path, num_gpus=0,
                        kubernetes={"kubernetes_conn_id": "rlhf_k8s", "logging_interval": 5,
                                    **kube})
    op = RlhfStepOperator(task_id="ppo", step="ppo", config_uri=path, backend="kubernetes")
    return op, cfg


def _first_event(trigger):
    async def first():
        async for event in trigger.run():
            return event.payload
    return asyncio.run(first())


def _deferred(op, context):
    from airflow.sdk.exceptions import TaskDeferred

    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context) if not isinstance(context, tuple) else \
            op.trainjob_reentry(*context)
    return deferred.value.trigger


def test_the_operator_creates_waits_streams_and_reads_the_result(tmp_path, monkeypatch):
    from rlhf_airflow import trainjob
    from rlhf_tasks.storage import Storage

    with fake_kubernetes(tmp_path, monkeypatch) as k8s:
        op, cfg = _operator(tmp_path)
        context = {"ti": _TI(), "run_id": "manual__1"}
        trigger = _deferred(op, context)  # created, then deferred: no worker slot
        name = trainjob.job_name("manual__1", "ppo", 1)
        assert list(k8s.jobs) == [name]
        assert k8s.jobs[name] == trainjob.manifest(cfg, "ppo", op.config_uri, [], name,
                                                  trainjob.result_uri(cfg, "ppo", 1))
        # still running after wake_after: the task wakes, copies node 0's log, defers again
        trigger.poll_interval, trigger.wake_after = 0.05, 0.2
        event = _first_event(trigger)
        assert event["status"] == "running"
        op._cached_logger = task_log = _TaskLog()
        again = _deferred(op, (context, event))
        assert "[node 0] update 2/3 reward 0.2" in task_log.lines
        assert k8s.log_requests[-1]["container"] == ["node"]  # node 0's trainer container
        assert again.logs_since > trigger.logs_since
        # the same try started again (its worker went away) finds its job and waits for it
        from rlhf_airflow.triggers.trainjob import TrainJobTrigger

        assert isinstance(_deferred(op, context), TrainJobTrigger)
        # done: node 0 wrote the result to the run's artifact store
        k8s.conditions = [{"type": "Complete", "status": "True", "reason": "JobsCompleted"}]
        k8s.exit_codes = {0: 0, 1: 0}
        Storage.from_config(cfg).write_json(trainjob.result_uri(cfg, "ppo", 1),
                                            {"step": "ppo", "updates": 3})
        done = _first_event(again)
        assert done["status"] == "succeeded"
        assert op.trainjob_reentry(context, done) == {"step": "ppo", "updates": 3}
        assert k8s.deleted == [name]


def test_a_node_that_exits_2_fails_the_task_without_retry(tmp_path, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    with fake_kubernetes(tmp_path, monkeypatch) as k8s:
        op, _ = _operator(tmp_path, on_finish_action="keep_pod")
        context = {"ti": _TI(), "run_id": "manual__2"}
        trigger = _deferred(op, context)
        k8s.conditions = [{"type": "Failed", "status": "True", "reason": "FailedJobs"}]
        k8s.exit_codes = {0: 2, 1: 2}
        event = _first_event(trigger)
        with pytest.raises(AirflowFailException, match="exit 2 on node 0"):
            op.trainjob_reentry(context, event)
        # any other failure is an ordinary error: Airflow retries, the step resumes
        k8s.exit_codes = {0: 1, 1: 137}
        with pytest.raises(RuntimeError, match=r"node exit codes \{0: 1, 1: 137\}"):
            op.trainjob_reentry(context, event)
        assert k8s.deleted == []  # keep_pod keeps failed and finished jobs alike
