"""MLflow conventions: a parent run per pipeline run, a child run per step.

* The parent run is tagged with the Airflow dag_id and run_id, base model and backend,
  and is found again by those tags, so a retried ``start`` step does not make a second one.
* Each step runs in a child run (``mlflow.parentRunId``) named after the step.
* Each child run logs the resolved config sections its step reads as params
  (``ppo.kl_coef``, ``reward.lora_rank``, ``model.base_model`` ...); the parent logs the
  whole config, as params and as ``config.json``, so runs compare and search by any
  setting.  Credentials inside URLs are masked; the run's own plumbing is left out.
* Metric names are namespaced (``data/``, ``reward/``, ``ppo/``, ``eval/``, ``panel/``) so
  runs compare side by side; ``log_metrics`` refuses a name outside those namespaces.
* Default tracking URI: ``sqlite:///.rlhf/mlflow.db``; artifacts under ``.rlhf/mlartifacts``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Iterator

NAMESPACES = ("data", "reward", "sft", "ppo", "dpo", "eval", "panel", "system", "cost")
# which config sections a step's run records as params (the parent records them all)
STEP_SECTIONS: dict[str, tuple[str, ...]] = {
    "validate": ("data", "model"),
    "reward": ("reward", "model", "data", "compute"),
    "sft": ("sft", "model", "data", "compute"),
    "ppo": ("ppo", "tuning", "model", "data", "compute"),
    "dpo": ("dpo", "tuning", "model", "data", "compute"),
    "evaluate": ("evaluation", "tuning", "model", "compute"),
    "panel_simulate": ("panel",),
    "gate": ("panel", "tuning", "registry", "cost"),
}
# not settings of the run: where it lives and who it is
_NOT_PARAMS = ("tracking.parent_run_id", "run.run_id", "run.triggered_by",
               "run.triggered_by_id", "run.approved_by", "panel.user_ids")
_PARAM_MAX = 6000  # MLflow's limit on a param value
_CREDENTIALS = re.compile(r"(://[^/:@\s]+):[^/@\s]*@")
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
        # a retried start, or a step run by hand with other settings: the parent keeps
        # the config it started with (MLflow params never change), gaining only params
        # it lacks (a start that failed half-way)
        run = found[0]
        log_params({k: v for k, v in config_params(cfg).items() if k not in run.data.params},
                   run.info.run_id)
        return run.info.run_id
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
    if cfg.run.triggered_by:
        all_tags["airflow.triggered_by"] = cfg.run.triggered_by
    run = client.create_run(experiment_id, run_name=f"{cfg.run.pipeline}:{cfg.run.run_id}",
                            tags=all_tags)
    log_params(config_params(cfg), run.info.run_id)
    masked = json.loads(mask_credentials(json.dumps(cfg.dump())))
    masked["tracking"].pop("parent_run_id", None)
    client.log_dict(run.info.run_id, masked, "config.json")
    return run.info.run_id


def ui_url(cfg) -> str | None:
    """The MLflow UI's address, if there is one to link to."""
    uri = cfg.tracking.tracking_uri
    found = (cfg.tracking.ui_url or (uri if uri.startswith(("http://", "https://")) else None)
             or os.environ.get("RLHF_MLFLOW_UI_URL") or None)
    if not found:
        return None
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(found)  # a link never carries the tracking URI's credentials
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])).rstrip("/")


def run_url(cfg, run_id: str) -> str | None:
    """The MLflow UI page of ``run_id`` (None without a UI to link to)."""
    import mlflow

    base = ui_url(cfg)
    if not base or not run_id:
        return None
    setup(cfg)
    experiment_id = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    from urllib.parse import quote

    return (f"{base}/#/experiments/{quote(str(experiment_id), safe='')}"
            f"/runs/{quote(run_id, safe='')}")


def artifact_url(cfg, run_id: str, path: str) -> str | None:
    """The MLflow UI page of artifact ``path`` of ``run_id`` (None without a UI)."""
    from urllib.parse import quote

    page = run_url(cfg, run_id)
    return f"{page}/artifacts/{quote(path, safe='/')}" if page else None


def end_pipeline_run(cfg, status: str = "FINISHED") -> None:
    import mlflow

    setup(cfg)
    if cfg.tracking.parent_run_id:  # empty when the run failed before start_tracking
        mlflow.MlflowClient().set_terminated(cfg.tracking.parent_run_id, status=status)


def mask_credentials(text: str) -> str:
    """``scheme://user:secret@host`` -> ``scheme://user:***@host``."""
    return _CREDENTIALS.sub(r"\1:***@", text)


def _param_value(value) -> str:
    text = mask_credentials(value if isinstance(value, str) else json.dumps(value, sort_keys=True))
    return text if len(text) <= _PARAM_MAX else text[:_PARAM_MAX - 1] + "…"


def config_params(cfg, sections: tuple[str, ...] | None = None) -> dict[str, str]:
    """The config as flat MLflow params: ``section.field`` (nested sections dotted further),
    lists and None as JSON, credentials in URLs masked, the run's own plumbing left out."""
    out: dict[str, str] = {}

    def walk(prefix: str, node) -> None:
        for key, value in node.items():
            name = f"{prefix}.{key}"
            if name in _NOT_PARAMS:
                continue
            if isinstance(value, dict):
                walk(name, value)
            else:
                out[name] = _param_value(value)

    for section, values in cfg.dump().items():
        if sections is None or section in sections:
            walk(section, values)
    return out


def log_params(params: dict[str, str], run_id: str | None = None) -> None:
    """Log params in MLflow's batches of 100 (to the active run, or ``run_id``)."""
    import mlflow
    from mlflow.entities import Param

    client = mlflow.MlflowClient()
    run_id = run_id or mlflow.active_run().info.run_id
    items = sorted(params.items())
    if not items:
        return
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[start:start + 100]])


def step_sections(step: str) -> tuple[str, ...]:
    return STEP_SECTIONS.get(step.split("_")[0] if step.startswith("validate_") else step, ())


@contextlib.contextmanager
def step_run(cfg, step: str, tags: dict[str, str] | None = None, *,
             system_metrics: bool = False, name: str | None = None) -> Iterator[str]:
    """A child run for ``step`` under the pipeline's parent run, named ``name`` (a
    bake-off's candidate; default the step); yields its run id.  The run records the
    config sections the step reads as params, and with ``system_metrics`` (training
    steps) CPU, memory and GPU use as ``system/*``."""
    import mlflow

    experiment_id = setup(cfg)
    parent = cfg.tracking.parent_run_id
    if not parent:
        parent = start_pipeline_run(cfg)
    if system_metrics:
        mlflow.set_system_metrics_sampling_interval(
            float(os.environ.get("RLHF_SYSTEM_METRICS_SECONDS", "10")))
    with mlflow.start_run(experiment_id=experiment_id, run_name=name or step, parent_run_id=parent,
                          log_system_metrics=system_metrics,
                          tags={"rlhf.step": step, PIPELINE_TAG: cfg.run.pipeline,
                                RUN_TAG: cfg.run.run_id, **(tags or {})}) as run:
        log_params(config_params(cfg, step_sections(step)))
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


# the answers with their models and verdicts, logged by the gate once the batch is closed
JUDGED_TABLE = "panel/answers.json"
ANSWER_COLUMNS = ("prompt_index", "prompt", "model", "response", "reward", "ended")


def log_answers(rows: list[dict], artifact_file: str = JUDGED_TABLE,
                verdicts: list[dict] | None = None) -> None:
    """The models' answers as an MLflow table (the run's Evaluation/Artifacts view; read
    back with ``mlflow.load_table``).  With ``verdicts`` (the store's verdict rows), each
    answer also carries the panel's passes, fails and comments."""
    import mlflow
    import pandas as pd

    frame = pd.DataFrame([{k: row.get(k) for k in ANSWER_COLUMNS} for row in rows],
                         columns=list(ANSWER_COLUMNS))
    if verdicts is not None:
        judged: dict[tuple[str, int], list[dict]] = {}
        for v in verdicts:
            judged.setdefault((v["model"], int(v["prompt_index"])), []).append(v)
        found = [judged.get((m, int(i)), []) for m, i in zip(frame["model"],
                                                             frame["prompt_index"])]
        frame["passes"] = [sum(bool(v["passed"]) for v in vs) for vs in found]
        frame["fails"] = [sum(not v["passed"] for v in vs) for vs in found]
        frame["comments"] = [" | ".join(v["comment"] for v in vs if v.get("comment"))
                             for vs in found]
    mlflow.log_table(frame, artifact_file=artifact_file)


def log_histograms(groups: dict[str, list[float]], artifact_file: str, *, title: str,
                   xlabel: str) -> None:
    """Overlaid histograms of ``groups`` (label -> values) as a PNG in the active run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    values = [v for vs in groups.values() for v in vs]
    if not values:
        return
    low, high = min(values), max(values)
    bins = [low + (high - low) * i / 20 for i in range(21)] if high > low else 10
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for label, vs in groups.items():
        if vs:
            ax.hist(vs, bins=bins, alpha=0.5, label=f"{label} (n={len(vs)})")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.legend()
    fig.tight_layout()
    mlflow.log_figure(fig, artifact_file)
    plt.close(fig)
