"""Pipeline bookkeeping steps: open and close the MLflow parent run."""

from __future__ import annotations

from rlhf_tasks import tracking
from rlhf_tasks.storage import Storage


def start(cfg) -> dict:
    """Create (or find, on a retry) the parent run; record the run's resolved config."""
    parent = tracking.start_pipeline_run(cfg)
    storage = Storage.from_config(cfg)
    config_uri = storage.write_json(cfg.step_uri("start", "config.json"),
                                    {**cfg.dump(), "tracking": {**cfg.dump()["tracking"],
                                                                "parent_run_id": parent}})
    return {"parent_run_id": parent, "run_uri": cfg.run_uri(),
            "config_uri": config_uri}


def finish(cfg) -> dict:
    tracking.end_pipeline_run(cfg, "FINISHED")
    return {"parent_run_id": cfg.tracking.parent_run_id, "status": "FINISHED"}


def abort(cfg) -> dict:
    tracking.end_pipeline_run(cfg, "FAILED")
    return {"parent_run_id": cfg.tracking.parent_run_id, "status": "FAILED"}
