"""``prepare_run``: the first task of a pipeline run (in the worker, light imports only).

Builds the run's config from the trigger form, fails fast (no retry) on an invalid value,
and writes it to ``<artifact_root>/<pipeline>/<run_id>/config.json``: every step of the
run reads that one file, locally or in a pod.
"""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowFailException

from rlhf_airflow.params import build_config
from rlhf_tasks.errors import BadInput
from rlhf_tasks.storage import Storage


def prepare_run(params: dict, dag_id: str, run_id: str) -> dict:
    try:
        cfg = build_config(params, dag_id, run_id)
        storage = Storage.from_config(cfg)
        uri = storage.write_json(cfg.step_uri("config.json"), cfg.dump())
    except BadInput as exc:
        raise AirflowFailException(str(exc)) from None
    return {"config_uri": uri, "run_uri": cfg.step_uri("").rstrip("/"),
            "backend": cfg.compute.backend, "sft_enabled": cfg.sft.enabled,
            "panel_mode": cfg.panel.mode, "approver": cfg.panel.approver}
