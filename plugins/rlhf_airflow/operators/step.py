"""``RlhfStepOperator``: runs one ``rlhf run STEP`` on the backend the run chose.

* ``local``: a subprocess on the worker, its output in the task log.
* ``kubernetes``: a pod (this operator *is* a KubernetesPodOperator), built from the run
  config by :func:`rlhf_airflow.pods.pod_settings`, deferrable (the task holds no
  worker slot while the pod runs; logs are fetched every ``logging_interval`` seconds),
  its result read back through the XCom sidecar.
* ``kubernetes`` with ``compute.num_nodes > 1`` (training steps): a Kubeflow Trainer
  TrainJob (:mod:`rlhf_airflow.trainjob`), as deferrable: created, waited for by a
  trigger, node 0's log copied every ``logging_interval`` seconds, its result read back
  from the run's artifact store.

The config is the run's own (``config_uri`` left at ``RUN_CONFIG``): derived from the run's
identity and pinned by its digest (:mod:`rlhf_airflow.run_config`), never taken from an
XCom; the backend is the one that config names.

Returns the step's JSON result (XCom).  Exit code 2 (bad input or config) fails the task
without retries on either backend; any other failure is an ordinary error, so Airflow
retries and the step resumes from its checkpoints.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk.exceptions import AirflowFailException

from rlhf_airflow.backends import StepFailed, get_backend, step_argv
from rlhf_airflow.links import MlflowRunLink
from rlhf_airflow.run_config import RUN_CONFIG

# the step of a candidate's training task: resolved at run time from the run's own config
# (``tuning.algorithms``), never from the mapped value (an XCom a user can change)
CANDIDATE_STEP = "@candidate"


def step_timeout(step: str):
    """``compute.step_timeout(step)`` of the base config (parse time) as a timedelta."""
    from datetime import timedelta

    from rlhf_airflow.scheduling import base_config
    from rlhf_tasks.config import PipelineConfig

    cfg = base_config() or PipelineConfig()
    return timedelta(hours=cfg.compute.step_timeout(step))


def placement(step: str) -> dict:
    """Where a step runs in Airflow: a GPU step (``rlhf_tasks.steps.GPU_STEPS``) on the GPU
    queue, in the ``gpu`` pool (``$RLHF_GPU_POOL``), taking a slot per GPU it holds (a
    training step on several nodes: every node's GPUs; the base config's sizes, read at
    parse time); the others on Airflow's defaults."""
    from rlhf_airflow.scheduling import GPU_POOL, GPU_QUEUE, base_config, limits
    from rlhf_tasks.steps import GPU_STEPS, TRAINING_STEPS

    if step not in GPU_STEPS:
        return {}
    slots = limits(base_config())["training_gpu_slots" if step in TRAINING_STEPS
                                  else "gpu_slots"]
    return {"queue": GPU_QUEUE, "pool": GPU_POOL, "pool_slots": slots}


def run_local_step(step: str, argv: list[str], log) -> dict:
    """``rlhf run`` as a subprocess on the worker; exit 2 (bad input) fails the task
    without retries, any other failure is an ordinary error (retried)."""
    try:
        return get_backend("local").run(step, argv, log)
    except StepFailed as exc:
        if exc.bad_input:
            raise AirflowFailException(str(exc)) from None
        raise RuntimeError(str(exc)) from None


def announce(operator, context, result):
    """A step's result: its MLflow page kept for the task's link, and what it produced
    announced on the task's Assets (promote: the new champion's model and version)."""
    if isinstance(result, dict):
        operator.mlflow_run_url = result.get("mlflow_run_url")
        for asset in operator.outlets or ():
            context["outlet_events"][asset].extra = {
                k: result[k] for k in ("model_name", "version", "champion")
                if k in result} | {"dag_id": context["dag"].dag_id,
                                   "run_id": context["run_id"]}
    return result


class RlhfStepOperator(KubernetesPodOperator):
    """Run one registered step (``rlhf run STEP``) on the backend the run's config names.

    :param step: the step's name in ``rlhf_tasks.steps.STEPS``; a GPU step takes the GPU
        queue and the ``gpu`` pool unless ``queue``/``pool``/``pool_slots`` are given.
    :param config_uri: the config file; default ``RUN_CONFIG``, the run's own config,
        derived from the run and pinned by its digest (never taken from an XCom).
    :param overrides: extra ``key=value`` settings for the step (templated).
    :param backend: ``local`` or ``kubernetes``; default the run config's
        ``compute.backend`` (the bookkeeping steps use ``local``).
    :param parent_run: the pipeline's MLflow parent run: ``start_tracking``'s result as an
        XComArg (its ``parent_run_id`` must be a 32-hex run id), or a run id.
    :param candidate: with ``step=CANDIDATE_STEP``, a training task mapped over the run's
        candidates: the algorithm it trains, which must be one of the run config's
        candidates; its step (``ppo`` or ``dpo``) comes from that config, and the task
        passes it to the step as ``tuning.candidate``.

    Other arguments are the ``KubernetesPodOperator``'s; the Kubernetes connection is the
    run config's ``compute.kubernetes.kubernetes_conn_id``.
    """

    template_fields: Sequence[str] = (*KubernetesPodOperator.template_fields, "config_uri",
                                      "overrides", "backend", "parent_run", "candidate")
    ui_color = "#e8d5f5"
    operator_extra_links = (MlflowRunLink(),)
    mlflow_run_url: str | None = None

    def __init__(self, *, step: str, config_uri: str = RUN_CONFIG,
                 overrides: list[str] | None = None, backend: str | None = None,
                 parent_run: Any = None, candidate: str | None = None, **kwargs):
        kwargs.setdefault("deferrable", True)
        kwargs.setdefault("get_logs", True)
        kwargs.setdefault("do_xcom_push", True)
        kwargs.setdefault("reattach_on_restart", True)
        kwargs.setdefault("execution_timeout", step_timeout(step))
        for name, value in placement(step).items():
            kwargs.setdefault(name, value)
        super().__init__(**kwargs)
        self.step, self.config_uri, self.config_sha256 = step, config_uri, None
        self.overrides, self.backend = list(overrides or []), backend
        self.parent_run, self.candidate = parent_run, candidate
        # what this task trains or does, for names that must differ between a bake-off's
        # tasks (TrainJob, result file): the candidate's folder once resolved, else the step
        self.unit = step

    def _pin_config(self, context) -> None:
        """The run's own config and its digest (RUN_CONFIG), before anything reads it; the
        pipeline's MLflow parent run (``parent_run``: start_tracking's result, rendered from
        its XComArg) as the step's one extra setting."""
        if self.config_uri == RUN_CONFIG:
            from rlhf_airflow.run_config import resolve

            self.config_uri, self.config_sha256 = resolve(context)
        if self.parent_run is not None:
            # start_tracking's result (rendered from its XComArg), or a run id
            found = self.parent_run.get("parent_run_id") if isinstance(self.parent_run, dict) \
                else self.parent_run
            run_id = str(found or "")
            if not re.fullmatch(r"[0-9a-f]{32}", run_id):
                raise AirflowFailException(f"step {self.step}: {run_id[:80]!r} is not an MLflow "
                                           "run id (start_tracking's result was changed?)")
            setting = f"tracking.parent_run_id={run_id}"
            if setting not in self.overrides:
                self.overrides.append(setting)
        if self.step == CANDIDATE_STEP:
            self._resolve_candidate()

    def _resolve_candidate(self) -> None:
        """The training step of the candidate this mapped task was given, read off the run's
        own config: a name that is not one of its candidates fails the task (no retry)."""
        from rlhf_tasks import config
        from rlhf_tasks.errors import BadInput

        try:
            cfg = config.load(self.config_uri, sha256=self.config_sha256)
        except BadInput as exc:
            raise AirflowFailException(f"step {self.step}: {exc}") from None
        found = next((c for c in cfg.candidates if c.algorithm == self.candidate), None)
        if found is None:
            raise AirflowFailException(
                f"{str(self.candidate)[:80]!r} is not one of this run's candidates "
                f"({', '.join(c.algorithm for c in cfg.candidates)}): the mapped value was "
                "changed after the run's config named them")
        self.step, self.unit = found.step, found.folder
        setting = f"tuning.candidate={found.algorithm}"
        if setting not in self.overrides:
            self.overrides.append(setting)

    # -- local -----------------------------------------------------------------------------
    def _run_local(self):
        argv = step_argv(self.step, self.config_uri, self.overrides, "@RESULT@",
                         self.config_sha256)
        return run_local_step(self.step, argv, self.log.info)

    # -- kubernetes ------------------------------------------------------------------------
    def configure_pod(self, cfg=None) -> None:
        """Set the pod's image, command, resources ... from the run config (which the
        operator reads at run time: the form chose the backend and the sizes)."""
        from airflow.providers.cncf.kubernetes.utils.pod_manager import OnFinishAction

        from rlhf_airflow.pods import pod_settings

        cfg = cfg or self._config()
        for name, value in pod_settings(cfg, self.step, self.config_uri, self.overrides,
                                        self.config_sha256).items():
            setattr(self, name, value)
        self.on_finish_action = OnFinishAction(self.on_finish_action)

    def _exit_code(self) -> int | None:
        pod = getattr(self, "pod", None)
        for status in (getattr(pod, "status", None) and pod.status.container_statuses) or []:
            if status.name == self.base_container_name and status.state.terminated:
                return status.state.terminated.exit_code
        return None

    def _fail_fast_on_bad_input(self, call):
        try:
            return call()
        except Exception as exc:
            if self._exit_code() == 2:
                raise AirflowFailException(f"step {self.step} rejected its input (exit 2): "
                                           f"{exc}") from None
            raise

    def _finished(self, context, result):
        """The step's result; its MLflow page kept for the task's link; what it produced
        announced on the task's Assets (promote: the new champion's model and version)."""
        return announce(self, context, result)

    # -- kubernetes, several nodes: a TrainJob ----------------------------------------------
    def _config(self):
        from rlhf_tasks import config

        return config.load(self.config_uri, self.overrides, sha256=self.config_sha256)

    @staticmethod
    def _hook(cfg):
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

        return KubernetesHook(conn_id=cfg.compute.kubernetes.kubernetes_conn_id)

    def _start_trainjob(self, context, cfg):
        from kubernetes.client.exceptions import ApiException

        from rlhf_airflow import trainjob

        try_number = context["ti"].try_number
        name = trainjob.job_name(context["run_id"], self.unit, try_number)
        body = trainjob.manifest(cfg, self.step, self.config_uri, self.overrides, name,
                                 trainjob.result_uri(cfg, self.unit, try_number),
                                 self.config_sha256)
        namespace = cfg.compute.kubernetes.namespace
        hook = self._hook(cfg)
        try:
            hook.create_custom_object(group=trainjob.GROUP, version=trainjob.VERSION,
                                      plural=trainjob.PLURAL, body=body, namespace=namespace)
        except ApiException as exc:
            if exc.status != 409:
                raise
            # this try created it before the worker went away: wait for that one
            self.log.info("TrainJob %s/%s exists already; waiting for it", namespace, name)
        else:
            self.log.info("TrainJob %s/%s created: %d nodes x %d processes, runtime %s",
                          namespace, name, cfg.compute.num_nodes,
                          max(1, cfg.compute.num_gpus), cfg.compute.kubernetes.training_runtime)
        self._wait_trainjob(cfg, name, logs_since=None)

    def _wait_trainjob(self, cfg, name: str, logs_since: float | None):
        from rlhf_airflow.triggers.trainjob import TrainJobTrigger

        kube = cfg.compute.kubernetes
        self.defer(trigger=TrainJobTrigger(name, kube.namespace, kube.kubernetes_conn_id,
                                           poll_interval=min(10.0, kube.logging_interval),
                                           wake_after=kube.logging_interval,
                                           logs_since=logs_since),
                   method_name="trainjob_reentry")

    def _node_pods(self, hook, namespace: str, name: str):
        from rlhf_airflow import trainjob

        return hook.core_v1_client.list_namespaced_pod(
            namespace, label_selector=f"{trainjob.JOBSET_LABEL}={name}").items

    def _copy_node0_log(self, hook, namespace: str, pods, since: float) -> float:
        """Node 0's log lines since ``since`` (epoch seconds) into the task log."""
        import math
        import time

        from rlhf_airflow import trainjob

        now = time.time()
        for pod in pods:
            if (pod.metadata.labels or {}).get(trainjob.INDEX_LABEL) != "0":
                continue
            try:
                response = hook.core_v1_client.read_namespaced_pod_log(
                    pod.metadata.name, namespace, container=trainjob.NODE,
                    since_seconds=max(1, math.ceil(now - since)), _preload_content=False)
                text = response.data.decode("utf-8", errors="replace")
            except Exception as exc:  # not started yet, or gone: the next wake tries again
                self.log.info("node 0 log not readable yet (%s)", type(exc).__name__)
                return since
            for line in text.splitlines():
                self.log.info("[node 0] %s", line)
        return now

    def trainjob_reentry(self, context, event):
        from rlhf_airflow import trainjob
        from rlhf_tasks.storage import Storage

        self._pin_config(context)
        cfg = self._config()
        hook = self._hook(cfg)
        name, state = event["name"], event["status"]
        namespace = cfg.compute.kubernetes.namespace
        if state == "error":
            raise RuntimeError(f"TrainJob {name}: the Kubernetes API failed: {event['reason']}")
        pods = self._node_pods(hook, namespace, name)
        since = self._copy_node0_log(hook, namespace, pods, event["logs_since"])
        if state == "running":
            return self._wait_trainjob(cfg, name, logs_since=since)
        if state == "failed":
            codes = trainjob.node_exit_codes(pods)
            if 2 in codes.values():
                raise AirflowFailException(f"step {self.step} rejected its input (exit 2 on "
                                           f"node {min(n for n, c in codes.items() if c == 2)}"
                                           f"): TrainJob {name}: {event['reason']}")
            raise RuntimeError(f"TrainJob {name} failed: {event['reason']} "
                               f"(node exit codes {codes})")
        result = Storage.from_config(cfg).read_json(
            trainjob.result_uri(cfg, self.unit, context["ti"].try_number))
        if cfg.compute.kubernetes.on_finish_action != "keep_pod":
            hook.delete_custom_object(group=trainjob.GROUP, version=trainjob.VERSION,
                                      plural=trainjob.PLURAL, name=name, namespace=namespace)
        return self._finished(context, result)

    def _backend(self, cfg) -> str:
        """The backend the operator was given, else the one the run's config names."""
        if cfg is None:
            return self.backend or "local"
        return self.backend or cfg.compute.backend

    def execute(self, context):
        self._pin_config(context)
        cfg = self._config_or_none()
        backend = self._backend(cfg)
        if backend == "local":
            return self._finished(context, self._run_local())
        if backend != "kubernetes":
            raise AirflowFailException(f"unknown backend {backend!r}; "
                                       "use 'local' or 'kubernetes'")
        from rlhf_airflow.trainjob import uses_trainjob

        cfg = cfg or self._config()
        if uses_trainjob(cfg, self.step):
            return self._start_trainjob(context, cfg)
        self.configure_pod(cfg)
        return self._finished(context, self._fail_fast_on_bad_input(
            lambda: super(RlhfStepOperator, self).execute(context)))

    def _config_or_none(self):
        """The run's config, checked against its digest (BadInput fails the task without
        retries); None for an operator given no config (a step that needs none)."""
        from rlhf_tasks.errors import BadInput

        if not self.config_uri:
            return None
        try:
            return self._config()
        except BadInput as exc:
            raise AirflowFailException(f"step {self.step}: {exc}") from None

    def trigger_reentry(self, context, event):
        # a resumed task is a fresh operator: pin the config and set the pod settings again
        self._pin_config(context)
        self.configure_pod()
        return self._finished(context, self._fail_fast_on_bad_input(
            lambda: super(RlhfStepOperator, self).trigger_reentry(context, event)))
