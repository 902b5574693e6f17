"""``prepare_run``: the first task of a pipeline run (in the worker, light imports only).

Builds the run's config from the admin's config file and the trigger form, fails fast (no
retry) on anything the form may not set or an invalid value, checks the approver, and
writes the config to ``<artifact_root>/<pipeline>/<run_id>/config.json`` with its sha256
in the XCom: every later task derives that location from the run and checks the digest
(:mod:`rlhf_airflow.run_config`).

Users are compared by id.  Airflow records only the triggering user's *name*; its id is
the name under the simple auth manager, and comes from the admin's ``panel.user_ids``
under others (a run that needs a sign-off stops when it is unknown).  The approver
(``panel.approver``, an id, from the admin's base config) must be an Airflow user, and
not the user who triggered the run.  Whether a user exists is answered by the simple auth
manager's user list; other auth managers keep their users in the metadata database, which
a task may not read in Airflow 3, so there the check is left to the sign-off itself (only
the assigned user can answer it) and the task log says so.
"""

from __future__ import annotations

import logging

from airflow.sdk.exceptions import AirflowFailException

from rlhf_airflow.params import build_config
from rlhf_tasks import config
from rlhf_tasks.errors import BadInput
from rlhf_tasks.storage import Storage

log = logging.getLogger(__name__)


SIMPLE_AUTH_MANAGER = "SimpleAuthManager"


def auth_manager() -> str:
    from airflow.configuration import conf

    return conf.get("core", "auth_manager", fallback="")


def airflow_users() -> set[str] | None:
    """The user ids of the simple auth manager; None when another auth manager (or the
    all-admins development mode) leaves that unknown to a task."""
    from airflow.configuration import conf

    if not auth_manager().endswith(SIMPLE_AUTH_MANAGER):
        return None
    if conf.getboolean("core", "simple_auth_manager_all_admins", fallback=False):
        return None
    return {u.split(":")[0].strip() for u in conf.getlist("core", "simple_auth_manager_users")
            if u.strip()}


def user_id(name: str | None, user_ids: dict[str, str]) -> str | None:
    """The Airflow user id of a user name: a run records only its triggering user's
    *name*, while sign-offs are answered and assigned by *id*.  The simple auth manager's
    ids are its names; other auth managers' (FAB: a number; Keycloak: a UUID) come from
    the admin's ``panel.user_ids``.  None when unknown."""
    if not name:
        return None
    if auth_manager().endswith(SIMPLE_AUTH_MANAGER):
        return name
    return user_ids.get(name)


def check_approver(approver: str | None, triggered_by: str | None,
                   triggered_by_id: str | None) -> None:
    """The approver is an Airflow user id, and not the id of the user who triggered the
    run.  Fails closed: a run with a sign-off whose triggering user's id is unknown stops."""
    if not approver:
        return
    if triggered_by and not triggered_by_id:
        raise BadInput(f"the id of {triggered_by!r}, who triggered this run, is unknown with "
                       f"this auth manager ({auth_manager() or 'none'}): the sign-off cannot "
                       "tell whether they approve their own run; the admin maps user names "
                       "to ids in the base config's panel.user_ids", field="panel.user_ids")
    if triggered_by_id and approver == triggered_by_id:
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
        triggered_by_id = user_id(triggered_by, cfg.panel.user_ids)
        cfg.run.triggered_by_id = triggered_by_id
        check_approver(cfg.panel.approver, triggered_by, triggered_by_id)
        storage = Storage.from_config(cfg)
        uri = storage.write_json(cfg.step_uri("config.json"), cfg.dump())
        # the digest of the bytes as stored: every later task checks the file against it
        digest = config.text_digest(config.read_source(uri))
    except BadInput as exc:
        raise AirflowFailException(str(exc)) from None
    return {"config_uri": uri, "config_sha256": digest, "run_uri": cfg.run_uri(),
            "backend": cfg.compute.backend, "sft_enabled": cfg.sft.enabled,
            "panel_mode": cfg.panel.mode, "approver": cfg.panel.approver}
