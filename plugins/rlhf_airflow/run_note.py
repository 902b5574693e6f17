"""The DAG run's note: after the gate, the headline (pass rates, the decision, the version).

Airflow 3 gives a task no way to write its run's note (the execution API reads notes
only), so this goes through Airflow's public REST API, as a service user the admin
configures in a connection, ``rlhf_airflow_api`` (``$RLHF_AIRFLOW_API_CONN_ID``): host =
the API server's base URL; login + password (a JWT is fetched from ``/auth/token``) or
only a password (used as the bearer token).  No connection: the note is not written
(logged).  A failure is logged and never fails the task.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)
DEFAULT_CONN_ID = "rlhf_airflow_api"


def headline(result: dict) -> str:
    """``promote: version 3; expert pass rates rlhf 87.0%, champion 76.0%`` (+ reasons, and
    the warnings: reward hacking, the RL curves' drift)."""
    rates = ", ".join(f"{m} {r:.1%}" for m, r in (result.get("pass_rates") or {}).items())
    text = f"{result.get('decision', '?')}: version {result.get('version', '?')}"
    if rates:
        text += f"; expert pass rates {rates}"
    if result.get("simulated"):
        text += " (simulated panel)"
    reasons = result.get("reasons") or []
    text += f". {'; '.join(reasons)}" if reasons else ""
    warnings = result.get("warnings") or []
    text += f". Warnings: {'; '.join(warnings)}" if warnings else ""
    return text + (f". Cost: {result['cost']}" if result.get("cost") else "")


def set_note(dag_id: str, run_id: str, note: str) -> bool:
    import httpx

    from rlhf_airflow.notifications.rlhf import connection

    name = os.environ.get("RLHF_AIRFLOW_API_CONN_ID", "").strip() or DEFAULT_CONN_ID
    conn = connection(name)
    if conn is None or not conn.host:
        log.info("run note not written: no Airflow connection %r", name)
        return False
    base = conn.host if "://" in conn.host else f"http://{conn.host}:{conn.port or 8080}"
    base = base.rstrip("/")
    try:
        token = conn.password
        if conn.login:
            reply = httpx.post(f"{base}/auth/token", timeout=10,
                               json={"username": conn.login, "password": conn.password})
            reply.raise_for_status()
            token = reply.json()["access_token"]
        reply = httpx.patch(f"{base}/api/v2/dags/{dag_id}/dagRuns/{run_id}",
                            params={"update_mask": "note"}, json={"note": note[:1000]},
                            headers={"Authorization": f"Bearer {token}"}, timeout=10)
        reply.raise_for_status()
    except Exception as exc:  # noqa: BLE001 - a note never fails the run
        log.warning("run note not written through %s: %s", name, exc)
        return False
    log.info("run note: %s", note)
    return True


def write_gate_headline(context) -> None:
    """The gate task's success callback: its result becomes the run's note."""
    ti = context["ti"]
    result = ti.xcom_pull(task_ids=ti.task_id) or {}
    set_note(ti.dag_id, ti.run_id, headline(result))
