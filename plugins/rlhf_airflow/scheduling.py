"""Retraining: the DAG's schedule and the preference dataset as an Airflow Asset.

Read at DAG parse time from the base config (``$RLHF_BASE_CONFIG``, a local file: the
parser must not reach S3), section ``schedule``:

* ``cron``: retrain on a time schedule (``CronTriggerTimetable``, UTC);
* ``on_new_preferences``: retrain when the Asset of ``data.preference_uri`` gets an event,
  from the ``rlhf_ingest_preferences`` DAG (which emits one only when the file's content
  changed) or from outside (the REST API, or an ``AssetWatcher`` on a message queue: see
  docs/ARCHITECTURE.md, Retraining);
* both: whichever comes first (``AssetOrTimeSchedule``).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable

from rlhf_tasks import config as rlhf_config
from rlhf_tasks.errors import BadInput

log = logging.getLogger(__name__)
PREFERENCES_ASSET = "rlhf-preferences"
# updated by rlhf_tuning's promote task (extra: model_name, version, run); deployment DAGs
# such as rlhf_deploy_champion are scheduled on it
CHAMPION_ASSET = Asset(name="rlhf-champion")
# the executor queue of the steps that hold a GPU (reward, sft, ppo, evaluate, the deploy
# smoke test); bookkeeping stays on Airflow's default queue.  Under the CeleryExecutor,
# the workers on GPU machines serve it (`airflow celery worker --queues gpu`); the Local
# and Kubernetes executors ignore queues.
GPU_QUEUE = os.environ.get("RLHF_GPU_QUEUE", "gpu")
# the pool that throttles GPU steps (`make airflow`, the compose stack and the Helm chart
# create it: `airflow pools set gpu <number of GPUs> "GPU steps"`)
GPU_POOL = os.environ.get("RLHF_GPU_POOL", "gpu")


def limits(cfg: rlhf_config.PipelineConfig | None) -> dict:
    """The DAG's limits from the base config: the pool slots of a GPU step
    (``compute.num_gpus``; a training step on several nodes: times ``num_nodes``) and the
    run's deadline alert (``schedule.run_deadline_hours``).  Step timeouts are the
    operator's (``compute.step_timeout``)."""
    from datetime import timedelta

    from airflow.sdk import AsyncCallback, DeadlineAlert, DeadlineReference

    cfg = cfg or rlhf_config.PipelineConfig()
    hours = cfg.schedule.run_deadline_hours
    deadline = None if hours is None else DeadlineAlert(
        reference=DeadlineReference.DAGRUN_QUEUED_AT, interval=timedelta(hours=hours),
        callback=AsyncCallback("rlhf_airflow.notifications.rlhf.run_overdue", kwargs={"hours": hours}))
    gpus = max(1, cfg.compute.num_gpus)
    return {"gpu_slots": gpus, "training_gpu_slots": gpus * cfg.compute.num_nodes,
            "deadline": deadline}


def base_config(path: str | None = None) -> rlhf_config.PipelineConfig | None:
    """The base config if it is a readable local file; None otherwise (logged, not raised:
    a DAG file that fails to parse would hide the DAG from every user).  Read once per
    version of the file: a DAG parse asks for it once per step task."""
    path = path if path is not None else os.environ.get("RLHF_BASE_CONFIG", "")
    if not path or "://" in path or not Path(path).is_file():
        return None
    stat = Path(path).stat()
    return _load_base_config(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _load_base_config(path: str, mtime_ns: int, size: int) -> rlhf_config.PipelineConfig | None:
    try:
        return rlhf_config.load(path)
    except BadInput as exc:
        log.error("ignoring the base config for scheduling: %s", exc)
        return None


def asset_uri(uri: str) -> str:
    """An Asset URI for a dataset location: ``s3://...`` as is, local paths as ``file://``."""
    if "://" in uri:
        return uri
    return Path(uri).expanduser().resolve().as_uri()


def preference_asset(cfg: rlhf_config.PipelineConfig | None) -> Asset | None:
    if cfg is None or not cfg.data.preference_uri:
        return None
    return Asset(name=PREFERENCES_ASSET, uri=asset_uri(cfg.data.preference_uri),
                 group="rlhf")


def retraining_schedule(cfg: rlhf_config.PipelineConfig | None):
    """None (manual runs only), a cron timetable, the preference Asset, or either one."""
    if cfg is None:
        return None
    cron = cfg.schedule.cron
    asset = preference_asset(cfg) if cfg.schedule.on_new_preferences else None
    if cron and asset:
        return AssetOrTimeSchedule(timetable=CronTriggerTimetable(cron, timezone="UTC"),
                                   assets=[asset])
    if cron:
        return CronTriggerTimetable(cron, timezone="UTC")
    if asset:
        return [asset]
    return None


def fingerprint(cfg) -> dict:
    """What identifies a version of the preference data: sha256, size and location."""
    from rlhf_tasks.storage import Storage, sha256_file

    storage = Storage.from_config(cfg)
    uri = cfg.data.preference_uri
    with storage.local_copy(uri) as path:
        return {"sha256": sha256_file(path), "bytes": path.stat().st_size, "uri": uri}
