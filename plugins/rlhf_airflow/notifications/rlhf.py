"""Notifications through Airflow's notifier mechanism, configured by one connection.

``RlhfNotifier`` is a ``BaseNotifier``: its ``subject`` and ``text`` are templates
rendered with the task's context, and it is used where Airflow takes notifiers (task
callbacks, the HITL operator's ``notifiers``) or called from an operator.  Where it sends
is the admin's choice, an Airflow connection (``$RLHF_NOTIFY_CONN_ID``, default
``rlhf_notifications``), never the trigger form's:

* ``smtp`` (or ``email``): an e-mail through the SMTP provider's ``SmtpNotifier`` on that
  connection; recipients in the connection's extra ``to`` (a list or a comma-separated
  string), the sender in ``from_email``;
* ``slackwebhook``: a Slack message through the Slack provider's
  ``SlackWebhookNotifier`` (the subject in bold, the text; the connection holds the
  webhook URL or token);
* ``apprise``: through the Apprise provider's ``AppriseNotifier``, to whatever the
  connection's Apprise URLs name (Microsoft Teams, Discord, Mattermost, ntfy, ...);
* ``http`` / ``https``: your own receiver: a JSON POST of the event (``payload``) to the
  connection's URL (host, port and ``extra.endpoint``); a password, if set, is sent as a
  bearer token.

The Slack and Apprise providers are optional: a connection of their type without the
provider installed is logged with the package to install.

No such connection: nothing is sent (logged once per task).  A notification that cannot
be delivered is logged and never fails the task or the run.

Events: ``run_failed`` (a task's final failure), ``review_waiting`` (a human panel's
batch is open: the review page and the quorum it needs), ``sign_off_waiting`` (the
approver's request), ``gate_decision`` (promote, reject or report, with pass rates).
"""

from __future__ import annotations

import html
import logging
import os
from typing import Any

from airflow.sdk import BaseNotifier

log = logging.getLogger(__name__)
DEFAULT_CONN_ID = "rlhf_notifications"


def conn_id() -> str:
    return os.environ.get("RLHF_NOTIFY_CONN_ID", "").strip() or DEFAULT_CONN_ID


def connection(name: str):
    """The Airflow connection ``name``; None when it is not configured."""
    from airflow.sdk import Connection

    try:
        return Connection.get(name)
    except Exception:  # noqa: BLE001 - AirflowNotFoundException and friends: not configured
        return None


def webhook_url(conn) -> str:
    scheme = conn.schema if conn.schema in ("http", "https") else (
        "https" if conn.conn_type == "https" else "http")
    port = f":{conn.port}" if conn.port else ""
    endpoint = (conn.extra_dejson.get("endpoint") or "").lstrip("/")
    host = conn.host or ""
    if "://" in host:
        return host.rstrip("/") + ("/" + endpoint if endpoint else "")
    return f"{scheme}://{host}{port}/{endpoint}"


# connection type -> (module, notifier class, the package that provides it)
PROVIDERS = {
    "slackwebhook": ("airflow.providers.slack.notifications.slack_webhook",
                     "SlackWebhookNotifier", "apache-airflow-providers-slack"),
    "apprise": ("airflow.providers.apprise.notifications.apprise", "AppriseNotifier",
                "apache-airflow-providers-apprise"),
}


def _slack_escape(text: str) -> str:
    """Slack's mrkdwn reads &, < and > as markup: the three it asks to escape."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class RlhfNotifier(BaseNotifier):
    """One event, sent where the admin's connection says (mail, Slack, Apprise, webhook).

    :param event: the event's name (``run_failed``, ``gate_decision`` ...), in the webhook
        payload.
    :param subject: the subject line (templated).
    :param text: the message (templated).
    :param notify_conn_id: the Airflow connection; default ``$RLHF_NOTIFY_CONN_ID``, else
        ``rlhf_notifications``.  No such connection: nothing is sent.
    """

    template_fields = ("subject", "text")

    def __init__(self, event: str, subject: str, text: str, *,
                 notify_conn_id: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.event, self.subject, self.text = event, subject, text
        self.notify_conn_id = notify_conn_id

    def payload(self, context: dict[str, Any]) -> dict[str, Any]:
        """What a webhook receives: the event, the rendered subject and text, the run."""
        ti = context.get("ti") or context.get("task_instance")
        dag_run = context.get("dag_run")
        return {"event": self.event, "subject": self.subject, "text": self.text,
                "dag_id": getattr(dag_run, "dag_id", None) or getattr(ti, "dag_id", None),
                "run_id": getattr(dag_run, "run_id", None) or getattr(ti, "run_id", None),
                "task_id": getattr(ti, "task_id", None)}

    def notify(self, context: dict[str, Any]) -> None:
        name = self.notify_conn_id or conn_id()
        conn = connection(name)
        if conn is None:
            log.info("notification %s not sent: no Airflow connection %r", self.event, name)
            return
        try:
            if conn.conn_type in ("smtp", "email"):
                self._mail(conn, name, context)
            elif conn.conn_type in PROVIDERS:
                self._through_provider(conn.conn_type, name, context)
            else:
                self._post(conn, context)
            log.info("notification %s sent through %s", self.event, name)
        except Exception as exc:  # noqa: BLE001 - a notification never fails the run
            log.warning("notification %s through %s failed: %s", self.event, name, exc)

    def _mail(self, conn, name: str, context) -> None:
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        to = conn.extra_dejson.get("to") or []
        if isinstance(to, str):
            to = [a.strip() for a in to.split(",") if a.strip()]
        if not to:
            raise ValueError(f"connection {name!r} has no recipients (extra 'to')")
        body = f"<pre>{html.escape(self.text)}</pre>"
        SmtpNotifier(to=to, from_email=conn.extra_dejson.get("from_email") or conn.login,
                     subject=self.subject, html_content=body,
                     smtp_conn_id=name).notify(context)

    def _through_provider(self, conn_type: str, name: str, context) -> None:
        """The provider's own notifier, formatting for its service; called with the
        already rendered subject and text (nothing is rendered twice)."""
        import importlib

        module, cls, package = PROVIDERS[conn_type]
        try:
            notifier_class = getattr(importlib.import_module(module), cls)
        except ImportError:
            raise RuntimeError(f"connection {name!r} is of type {conn_type!r}: install "
                               f"{package} on the workers") from None
        if conn_type == "slackwebhook":
            notifier = notifier_class(slack_webhook_conn_id=name,
                                      text=f"*{_slack_escape(self.subject)}*\n"
                                           f"{_slack_escape(self.text)}")
        else:
            notifier = notifier_class(apprise_conn_id=name, title=self.subject,
                                      body=self.text)
        notifier.notify(context)

    def _post(self, conn, context) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {conn.password}"} if conn.password else {}
        response = httpx.post(webhook_url(conn), json=self.payload(context), headers=headers,
                              timeout=10)
        response.raise_for_status()


def run_failed() -> RlhfNotifier:
    """A task's final failure (the run fails with it)."""
    return RlhfNotifier(
        "run_failed",
        subject="[rlhf] {{ dag.dag_id }} run {{ run_id }} failed at {{ ti.task_id }}",
        text="Task {{ ti.task_id }} of {{ dag.dag_id }} run {{ run_id }} failed "
             "(try {{ ti.try_number }}).\nError: {{ exception }}\n"
             "Log: {{ ti.log_url }}")


# the gate's pass rates as "rlhf 87.0%, champion 76.0%" (a Jinja expression)
PASS_RATES = ("{% for m, r in (ti.xcom_pull(task_ids='gate')['pass_rates'] or {}).items() %}"
          "{{ m }} {{ '%.1f' | format(r * 100) }}%{{ ', ' if not loop.last }}{% endfor %}")


# where a person reads more: the gate's MLflow run, its report there, the review page
# (links of the MLflow UI and Airflow, never a path on a worker)
LINKS = ("{% set gate = ti.xcom_pull(task_ids='gate') or {} %}"
         "{% set wait = ti.xcom_pull(task_ids='wait_for_panel') or {} %}"
         "MLflow run: {{ gate.get('mlflow_run_url') or 'run ' ~ gate.get('mlflow_run_id') ~ "
         "' (no MLflow UI address is configured: tracking.ui_url)' }}\n"
         "{% if gate.get('report_url') %}Report: {{ gate['report_url'] }}\n{% endif %}"
         "{% if wait.get('review_url') %}Review page: {{ wait['review_url'] }}\n{% endif %}")


def gate_decision() -> RlhfNotifier:
    return RlhfNotifier(
        "gate_decision",
        subject="[rlhf] {{ dag.dag_id }} run {{ run_id }}: gate decided "
                "{{ ti.xcom_pull(task_ids='gate')['decision'] }}",
        text="Decision: {{ ti.xcom_pull(task_ids='gate')['decision'] }} "
             "(version {{ ti.xcom_pull(task_ids='gate')['version'] }}).\n"
             "Expert pass rates: " + PASS_RATES + "\n"
             "Reasons: {{ ti.xcom_pull(task_ids='gate')['reasons'] | join('; ') }}\n" + LINKS)


def sign_off_waiting() -> RlhfNotifier:
    return RlhfNotifier(
        "sign_off_waiting",
        subject="[rlhf] sign-off waiting: promote {{ dag.dag_id }} version "
                "{{ ti.xcom_pull(task_ids='gate')['version'] }}?",
        text="The gate decided to promote version {{ ti.xcom_pull(task_ids='gate')['version'] }}"
             " of {{ dag.dag_id }} run {{ run_id }}; your sign-off is required.\n"
             "Expert pass rates: " + PASS_RATES + "\n"
             "Answer in Airflow (Required actions), or it counts as Reject when the wait "
             "ends.\n" + LINKS)


async def run_overdue(context=None, **kwargs) -> None:
    """The DAG's deadline alert (runs in the triggerer): a run is taking too long.
    Airflow passes ``context["dag_run"]`` as the REST API's JSON of the run."""
    import asyncio
    from types import SimpleNamespace

    found = (context or {}).get("dag_run") or {}
    dag_id = str(found.get("dag_id") or "rlhf_tuning")
    run_id = str(found.get("dag_run_id") or found.get("run_id") or "?")
    dag_run = SimpleNamespace(dag_id=dag_id, run_id=run_id)
    notifier = RlhfNotifier(
        "run_overdue", subject=f"[rlhf] {dag_id} run {run_id} is past its deadline",
        text=f"{dag_id} run {run_id} has been going for more than "
             f"{kwargs.get('hours', '?')} h since it was queued (schedule.run_deadline_hours).")
    await asyncio.to_thread(notifier.notify, {"dag_run": dag_run})


def review_waiting(context, *, batch_id: str, items: int, verdicts_needed: int, k: int,
                   review_url: str, deadline_hours: float, sequential: bool = False) -> None:
    """Tell the panel a batch waits for them (called by the panel wait when it starts)."""
    # values go into a template: no Jinja syntax may come with them
    review_url = review_url.replace("{", "%7B").replace("}", "%7D")
    batch_id = "".join(c for c in batch_id if c.isalnum() or c in "-_")
    RlhfNotifier(
        "review_waiting",
        subject=f"[rlhf] review batch waiting: {items} answers, {k} verdicts each",
        text=f"A blinded review batch of {{{{ dag.dag_id }}}} run {{{{ run_id }}}} waits for "
             f"the expert panel: {items} answers, {k} verdicts each ({verdicts_needed} in "
             f"all), within {deadline_hours:g} h."
             + (" A sequential panel: it stops as soon as the comparison is settled, "
                "usually well before." if sequential else "")
             + f"\nReview page: {review_url}\n"
             f"Batch: {batch_id}")(context)
