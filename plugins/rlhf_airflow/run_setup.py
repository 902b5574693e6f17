"""``prepare_run``: the first task of a pipeline run (in the worker, light imports only).

Builds the run's config from the admin's config file and the trigger form, fails fast (no
retry) on anything the form may not set or an invalid value, checks the approver, and
writes the config to ``<artifact_root>/<pipeline>/<run_id>/config.json``: every step of
the run reads that one file, locally or in a pod.

The approver (``panel.approver``, from the admin's config) must be an Airflow user, and
not the user who triggered the run.  Whether a user exists is answered by the simple auth
manager's user list; other auth managers keep their users in the metadata database, which
a task may not read in Airflow 3, so there the check is left to the sign-off itself (only
the assigned user can answer it) and the task log says so.
"""

from __future__ import annotations

import logging

from airflow.sdk.exceptions import AirflowFailException

from rlhf_airflow.params import build_config
from rlhf_tasks.errors import BadInput
from rlhf_tasks.storage import Storage

log = logging.getLogger(__name__)


def airflow_users() -> set[str] | None:
    """The user ids of the simple auth manager; None when another auth manager (or the
    all-admins development mode) leaves that unknown to a task."""
    from airflow.configuration import conf

    manager = conf.get("core", "auth_manager", fallback="")
    if not manager.endswith("SimpleAuthManager"):
        return None
    if conf.getboolean("core", "simple_auth_manager_all_admins", fallback=False):
        return None
    return {u.split(":")[0].strip() for u in conf.getlist("core", "simple_auth_manager_users")
            if u.strip()}


def check_approver(approver: str | None, triggered_by: str | None) -> None:
    if not approver:
        return
    if triggered_by and approver == triggered_by:
        raise BadInput(f"panel.approver {approver!r} triggered this run: the approver cannot "
                       "sign off their own run; another user must trigger it",
                       field="panel.approver")
    users = airflow_users()
    if users is None:
        log.warning("cannot list Airflow users with this auth manager: approver %r is "
                    "checked when the sign-off is answered", approver)
    elif approver not in users:
        raise BadInput(f"panel.approver {approver!r} is not an Airflow user (known users: "
                       f"{', '.join(sorted(users)) or 'none'})", field="panel.approver")


def prepare_run(params: dict, dag_id: str, run_id: str, *, conf: dict | None = None,
                triggered_by: str | None = None) -> dict:
    try:
        cfg = build_config(params, dag_id, run_id, conf=conf, triggered_by=triggered_by)
        check_approver(cfg.panel.approver, triggered_by)
        storage = Storage.from_config(cfg)
        uri = storage.write_json(cfg.step_uri("config.json"), cfg.dump())
    except BadInput as exc:
        raise AirflowFailException(str(exc)) from None
    return {"config_uri": uri, "run_uri": cfg.step_uri("").rstrip("/"),
            "backend": cfg.compute.backend, "sft_enabled": cfg.sft.enabled,
            "panel_mode": cfg.panel.mode, "approver": cfg.panel.approver}
