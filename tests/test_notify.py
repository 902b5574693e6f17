"""Notifications through Airflow's notifier mechanism, against real servers: an SMTP
server (aiosmtpd) and a webhook receiver, both started here; the connection is an
Airflow connection from the environment, as an admin would set it."""

from types import SimpleNamespace

import pytest
from conftest import smtp_connection, smtp_server, webhook_connection, webhook_receiver


def _context():
    from airflow.sdk import DAG

    run = "http://mlflow:5000/#/experiments/1/runs/abc"
    xcoms = {"gate": {"decision": "promote", "version": "3", "pass_rates": {"rlhf": 0.87},
                      "reasons": ["lift 0.11"], "report_uri": "s3://r/report.html",
                      "mlflow_run_id": "abc", "mlflow_run_url": run,
                      "report_url": f"{run}/artifacts/panel/report.html"},
             "wait_for_panel": {"status": "quorum",
                                "review_url": "http://airflow:8080/rlhf-review/"}}
    ti = SimpleNamespace(task_id="reward", dag_id="rlhf_tuning", run_id="manual__1",
                         try_number=2, log_url="http://airflow/log",
                         xcom_pull=lambda task_ids: xcoms.get(task_ids))
    return {"ti": ti, "task_instance": ti, "run_id": "manual__1",
            "dag": DAG("rlhf_tuning", schedule=None),
            "dag_run": SimpleNamespace(dag_id="rlhf_tuning", run_id="manual__1"),
            "exception": "step reward exited with code 1"}


def test_failure_is_posted_to_the_webhook_with_its_token(monkeypatch):
    from rlhf_airflow.notifications.rlhf import run_failed

    with webhook_receiver() as (base, received):
        monkeypatch.setenv("AIRFLOW_CONN_RLHF_NOTIFICATIONS", webhook_connection(base, "tok3n"))
        run_failed()(_context())
    assert len(received) == 1
    got = received[0]
    assert got["path"] == "/hooks/rlhf" and got["auth"] == "Bearer tok3n"
    assert got["event"] == "run_failed" and got["task_id"] == "reward"
    assert got["subject"] == "[rlhf] rlhf_tuning run manual__1 failed at reward"
    assert "exited with code 1" in got["text"] and "http://airflow/log" in got["text"]


def test_gate_decision_and_review_batch_are_mailed(monkeypatch):
    from rlhf_airflow.notifications.rlhf import gate_decision, review_waiting

    with smtp_server() as (port, messages):
        monkeypatch.setenv("AIRFLOW_CONN_RLHF_NOTIFICATIONS", smtp_connection(port))
        gate_decision()(_context())
        review_waiting(_context(), batch_id="b-1", items=80, verdicts_needed=240, k=3,
                       review_url="http://airflow/rlhf-review/", deadline_hours=72)
    assert [m["subject"] for m in messages] == [
        "[rlhf] rlhf_tuning run manual__1: gate decided promote",
        "[rlhf] review batch waiting: 80 answers, 3 verdicts each"]
    assert messages[0]["to"] == ["panel@example.org", "ml-team@example.org"]
    assert "Expert pass rates: rlhf 87.0%\n" in messages[0]["body"]
    # links a person can open: the gate's MLflow run, its report there, the review page;
    # never the artifact's path on a worker or in the store
    assert "MLflow run: http://mlflow:5000/#/experiments/1/runs/abc\n" in messages[0]["body"]
    assert ("Report: http://mlflow:5000/#/experiments/1/runs/abc/artifacts/panel/report.html"
            in messages[0]["body"])
    assert "Review page: http://airflow:8080/rlhf-review/" in messages[0]["body"]
    assert "s3://" not in messages[0]["body"]
    assert "http://airflow/rlhf-review/" in messages[1]["body"]
    assert "240 in all" in messages[1]["body"]


def test_without_an_mlflow_ui_the_mail_names_the_run_and_no_path(monkeypatch):
    from rlhf_airflow.notifications.rlhf import sign_off_waiting

    context = _context()
    gate = {"decision": "promote", "version": "3", "pass_rates": {"rlhf": 0.87},
            "mlflow_run_id": "abc", "mlflow_run_url": None, "report_url": None,
            "report_uri": "/worker/tmp/report.html"}
    context["ti"].xcom_pull = lambda task_ids: gate if task_ids == "gate" else None
    with smtp_server() as (port, messages):
        monkeypatch.setenv("AIRFLOW_CONN_RLHF_NOTIFICATIONS", smtp_connection(port))
        sign_off_waiting()(context)
    body = messages[0]["body"]
    assert "MLflow run: run abc (no MLflow UI address is configured: tracking.ui_url)" in body
    assert "/worker/" not in body and "Report:" not in body and "Review page:" not in body


def test_no_connection_sends_nothing_and_a_dead_receiver_never_fails(monkeypatch, caplog):
    from conftest import free_port

    from rlhf_airflow.notifications.rlhf import run_failed

    monkeypatch.delenv("AIRFLOW_CONN_RLHF_NOTIFICATIONS", raising=False)
    run_failed()(_context())  # not configured: logged, nothing raised
    monkeypatch.setenv("AIRFLOW_CONN_RLHF_NOTIFICATIONS",
                       webhook_connection(f"http://127.0.0.1:{free_port()}"))
    run_failed()(_context())  # nobody listening: logged, nothing raised
    assert "failed" in caplog.text


@pytest.mark.parametrize("extra", [{}, {"to": ""}])
def test_a_mail_connection_without_recipients_is_reported(monkeypatch, caplog, extra):
    import json

    from rlhf_airflow.notifications.rlhf import run_failed

    conn = json.loads(smtp_connection(1))
    conn["extra"] = {**conn["extra"], "to": extra.get("to")} if extra else {"disable_tls": True}
    monkeypatch.setenv("AIRFLOW_CONN_RLHF_NOTIFICATIONS", json.dumps(conn))
    run_failed()(_context())
    assert "has no recipients" in caplog.text


def test_the_run_note_headline():
    from rlhf_airflow.run_note import headline

    assert headline({"decision": "promote", "version": "3",
                     "pass_rates": {"rlhf": 0.87, "champion": 0.7612}, "reasons": [],
                     "simulated": False}) == \
        "promote: version 3; expert pass rates rlhf 87.0%, champion 76.1%"
    assert headline({"decision": "reject", "version": "4", "pass_rates": {"rlhf": 0.5},
                     "reasons": ["below the minimum 0.600"], "simulated": True}) == \
        ("reject: version 4; expert pass rates rlhf 50.0% (simulated panel). "
         "below the minimum 0.600")
    assert headline({"decision": "reject", "version": "5", "pass_rates": {"rlhf": 0.5},
                     "warnings": ["possible reward hacking: ...", "ppo: entropy 0.010 ..."]}) \
        == ("reject: version 5; expert pass rates rlhf 50.0%. Warnings: possible reward "
            "hacking: ...; ppo: entropy 0.010 ...")
    assert headline({"decision": "promote", "version": "6", "pass_rates": {"rlhf": 0.9},
                     "cost": "tuning 12.00 USD; break-even after 5 answers"}) == \
        ("promote: version 6; expert pass rates rlhf 90.0%. Cost: tuning 12.00 USD; "
         "break-even after 5 answers")


def test_no_api_connection_writes_no_note(monkeypatch, caplog):
    import logging

    from rlhf_airflow.run_note import set_note

    monkeypatch.delenv("AIRFLOW_CONN_RLHF_AIRFLOW_API", raising=False)
    with caplog.at_level(logging.INFO):
        assert set_note("rlhf_tuning", "r1", "x") is False
    assert "no Airflow connection 'rlhf_airflow_api'" in caplog.text


def test_the_deadline_alert_callback_notifies(monkeypatch):
    """What the DAG's DeadlineAlert runs in the triggerer when a run is past its time."""
    import asyncio

    from rlhf_airflow.notifications.rlhf import run_overdue

    with webhook_receiver() as (base, received):
        monkeypatch.setenv("AIRFLOW_CONN_RLHF_NOTIFICATIONS", webhook_connection(base))
        # the context Airflow's deadline handling passes: the run as the REST API's JSON
        asyncio.run(run_overdue({"dag_run": {"dag_id": "rlhf_tuning",
                                             "dag_run_id": "scheduled__1"},
                                 "deadline": {"id": "d1"}}, hours=96))
    assert [r["event"] for r in received] == ["run_overdue"]
    assert received[0]["subject"] == "[rlhf] rlhf_tuning run scheduled__1 is past its deadline"
    assert "more than 96 h" in received[0]["text"]


def test_slack_and_apprise_through_their_providers(monkeypatch):
    """A ``slackwebhook`` connection posts through the Slack provider's notifier (Slack's
    message format, the subject in bold, markup escaped); an ``apprise`` connection through
    Apprise's (here its ``json://`` service: title and message).  Both to a real local
    receiver standing in for the service."""
    import json

    from rlhf_airflow.notifications.rlhf import gate_decision

    with webhook_receiver() as (base, received):
        monkeypatch.setenv("AIRFLOW_CONN_RLHF_NOTIFICATIONS", json.dumps(
            {"conn_type": "slackwebhook", "password": f"{base}/services/T000/B000/XXXX"}))
        gate_decision()(_context())
        monkeypatch.setenv("AIRFLOW_CONN_RLHF_NOTIFICATIONS", json.dumps(
            {"conn_type": "apprise", "extra": {"config": {
                "path": base.replace("http://", "json://") + "/apprise"}}}))
        gate_decision()(_context())
    slack, apprise = received
    assert slack["path"] == "/services/T000/B000/XXXX"
    assert slack["text"].startswith("*[rlhf] rlhf_tuning run manual__1: gate decided promote*\n")
    assert "Expert pass rates: rlhf 87.0%" in slack["text"]
    assert apprise["path"] == "/apprise"
    assert apprise["title"] == "[rlhf] rlhf_tuning run manual__1: gate decided promote"
    assert "Review page: http://airflow:8080/rlhf-review/" in apprise["message"]


def test_a_provider_that_is_not_installed_is_named(monkeypatch, caplog):
    import json
    import sys

    from rlhf_airflow.notifications.rlhf import run_failed

    monkeypatch.setitem(sys.modules, "airflow.providers.slack.notifications.slack_webhook", None)
    monkeypatch.setenv("AIRFLOW_CONN_RLHF_NOTIFICATIONS", json.dumps(
        {"conn_type": "slackwebhook", "password": "http://127.0.0.1:9/x"}))
    with caplog.at_level("WARNING"):
        run_failed()(_context())  # never fails the task
    assert "install apache-airflow-providers-slack" in caplog.text
