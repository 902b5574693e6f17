"""MLflow conventions: a parent run per pipeline run, a child run per step.

* The parent run is tagged with the Airflow dag_id and run_id, base model and backend,
  and is found again by those tags, so a retried ``start`` step does not make a second one.
* Each step runs in a child run (``mlflow.parentRunId``) named after the step.
* Metric names are namespaced (``data/``, ``reward/``, ``ppo/``, ``eval/``, ``panel/``) so
  runs compare side by side; ``log_metrics`` refuses a name outside those namespaces.
* Default tracking URI: ``sqlite:///.rlhf/mlflow.db``; artifacts under ``.rlhf/mlartifacts``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

NAMESPACES = ("data", "reward", "sft", "ppo", "eval", "panel", "system")
PIPELINE_TAG = "rlhf.pipeline"
RUN_TAG = "rlhf.pipeline_run_id"


def metric_name(namespace: str, name: str) -> str:
    if namespace not in NAMESPACES:
        raise ValueError(f"metric namespace {namespace!r} is not one of {NAMESPACES}")
    clean = name.strip("/").replace(" ", "_")
    return f"{namespace}/{clean}"


def resolve_uri(uri: str) -> str:
    """Make a relative ``sqlite:///`` path absolute so subprocesses agree on it (MLflow's
    store and the panel's verdict store both go through here)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and ":memory:" not in uri:
        path = Path(uri[len(prefix):]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    return uri


def setup(cfg) -> str:
    """Point MLflow at the configured store; create the experiment. Returns its id."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    uri = resolve_uri(cfg.tracking.tracking_uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = cfg.tracking.artifact_location
    if location is None and uri.startswith("sqlite:///"):
        location = (Path(".rlhf") / "mlartifacts").resolve().as_uri()
    try:
        return client.create_experiment(cfg.tracking.experiment, artifact_location=location)
    except Exception:  # noqa: BLE001 - a concurrent step created it first
        return client.get_experiment_by_name(cfg.tracking.experiment).experiment_id


def start_pipeline_run(cfg, tags: dict[str, str] | None = None) -> str:
    """Find or create the parent run of this pipeline run; returns its run id."""
    import mlflow

    experiment_id = setup(cfg)
    client = mlflow.MlflowClient()
    found = client.search_runs(
        [experiment_id],
        filter_string=(f"tags.`{PIPELINE_TAG}` = '{cfg.run.pipeline}' and "
                       f"tags.`{RUN_TAG}` = '{cfg.run.run_id}'"),
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    all_tags = {
        PIPELINE_TAG: cfg.run.pipeline,
        RUN_TAG: cfg.run.run_id,
        "airflow.dag_id": cfg.run.pipeline,
        "airflow.run_id": cfg.run.run_id,
        "base_model": cfg.model.base_model,
        "backend": cfg.compute.backend,
        "panel.mode": cfg.panel.mode,
        **(tags or {}),
    }
    run = client.create_run(experiment_id, run_name=f"{cfg.run.pipeline}:{cfg.run.run_id}",
                            tags=all_tags)
    return run.info.run_id


def end_pipeline_run(cfg, status: str = "FINISHED") -> None:
    import mlflow

    setup(cfg)
    if cfg.tracking.parent_run_id:  # empty when the run failed before start_tracking
        mlflow.MlflowClient().set_terminated(cfg.tracking.parent_run_id, status=status)


@contextlib.contextmanager
def step_run(cfg, step: str, tags: dict[str, str] | None = None) -> Iterator[str]:
    """A child run for ``step`` under the pipeline's parent run; yields its run id."""
    import mlflow

    experiment_id = setup(cfg)
    parent = cfg.tracking.parent_run_id
    if not parent:
        parent = start_pipeline_run(cfg)
    with mlflow.start_run(experiment_id=experiment_id, run_name=step, parent_run_id=parent,
                          tags={"rlhf.step": step, PIPELINE_TAG: cfg.run.pipeline,
                                RUN_TAG: cfg.run.run_id, **(tags or {})}) as run:
        yield run.info.run_id


def log_metrics(namespace: str, metrics: dict[str, float], step: int | None = None) -> None:
    import mlflow

    mlflow.log_metrics({metric_name(namespace, k): float(v) for k, v in metrics.items()},
                       step=step)


def log_dataset(df, *, name: str, source: str, digest: str, context: str) -> None:
    """Log a canonical dataset as an MLflow input (digest and source URI)."""
    import mlflow
    from mlflow.data.pandas_dataset import from_pandas

    dataset = from_pandas(df, source=source, name=name, digest=digest[:36])
    mlflow.log_input(dataset, context=context)
