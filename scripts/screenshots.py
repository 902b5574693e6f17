"""README screenshots in a real headless browser (Debian's chromium through selenium).

Run while `make airflow` is up, after at least two `make demo` runs:
    .venv/bin/python scripts/screenshots.py [--out docs/img]
Takes: the DAG's sectioned trigger form, a run's graph, the review page in the Airflow
UI, MLflow's comparison of the last two PPO runs (their params) and gates, the answers
table of the last evaluation, the last gate's evaluation runs and an answer's trace with
the panel's feedback (MLflow's GenAI views), and a notification mail as a mail client
shows it (sent through the notifier to a local SMTP server).

With ``--mlflow-only`` (an MLflow UI on the demo's store is enough: `mlflow ui
--backend-store-uri sqlite:///$PWD/.rlhf/mlflow.db`) it takes the MLflow GenAI views only.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def browser(width: int = 1400, height: int = 900):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def mlflow_page(driver, url: str) -> None:
    """Open an MLflow UI page afresh (a hash change alone does not refetch its runs) and
    close the assistant's side panel."""
    from selenium.webdriver.common.by import By

    driver.get("about:blank")
    driver.get(url)
    time.sleep(6)
    for button in driver.find_elements(By.XPATH, "//button[@aria-label='Close' or "
                                       "contains(@aria-label, 'lose')]"):
        try:
            button.click()
        except Exception:  # noqa: BLE001 - not every match is the panel's
            pass
    time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "docs" / "img"))
    parser.add_argument("--airflow", default="http://localhost:8080")
    parser.add_argument("--mlflow", default="http://localhost:5000")
    parser.add_argument("--mlflow-only", action="store_true",
                        help="only the MLflow GenAI views (no Airflow needed)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.mlflow_only:
        driver = browser()
        try:
            genai_views(driver, args.mlflow, out)
        finally:
            driver.quit()
        return
    home = Path(os.environ.get("AIRFLOW_HOME", ROOT / ".rlhf" / "airflow"))
    user, password = next(iter(json.loads((home / "passwords.json").read_text()).items()))
    token = httpx.post(f"{args.airflow}/auth/token",
                       json={"username": user, "password": password}).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    runs = httpx.get(f"{args.airflow}/api/v2/dags/rlhf_tuning/dagRuns",
                     params={"order_by": "-start_date", "limit": 1}, headers=headers).json()
    run_id = runs["dag_runs"][0]["dag_run_id"]

    from selenium.webdriver.common.by import By

    driver = browser()
    try:
        driver.get(args.airflow + "/")
        driver.add_cookie({"name": "_token", "value": token, "path": "/"})
        driver.get(f"{args.airflow}/dags/rlhf_tuning/runs/{run_id}")
        time.sleep(6)
        driver.save_screenshot(str(out / "airflow-run-graph.png"))
        driver.get(f"{args.airflow}/dags/rlhf_tuning")
        time.sleep(4)
        for button in driver.find_elements(By.TAG_NAME, "button"):
            if button.text.strip().startswith("Trigger"):
                button.click()
                break
        time.sleep(3)
        # the form's sections: open the first few so the titles and fields show
        title = "Reinforcement learning (PPO)"
        for header in driver.find_elements(By.XPATH, f"//button[normalize-space(.)='{title}']")[:1]:
            driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", header)
            header.click()
        time.sleep(1)
        driver.save_screenshot(str(out / "airflow-trigger-form.png"))
        driver.get(f"{args.airflow}/rlhf-review/")
        time.sleep(3)
        driver.save_screenshot(str(out / "airflow-review-page.png"))

        import mlflow

        mlflow.set_tracking_uri(args.mlflow)
        frame = mlflow.search_runs(experiment_names=["rlhf-tuning"],
                                   filter_string="tags.`rlhf.step` = 'gate'",
                                   order_by=["start_time DESC"], max_results=2)
        ids = json.dumps(list(frame["run_id"]))
        experiment = json.dumps([frame.iloc[0]["experiment_id"]])
        mlflow_page(driver, f"{args.mlflow}/#/compare-runs?runs={ids}&experiments={experiment}")
        # down to the metrics table: panel/* side by side for the two gates
        for element in driver.find_elements(By.XPATH, "//*[normalize-space(text())='Metrics']"):
            driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", element)
        time.sleep(1)
        driver.save_screenshot(str(out / "mlflow-compare-gates.png"))

        # two PPO runs' settings side by side (params ppo.*)
        frame = mlflow.search_runs(experiment_names=["rlhf-tuning"],
                                   filter_string="tags.`rlhf.step` = 'ppo'",
                                   order_by=["start_time DESC"], max_results=2)
        ids = json.dumps(list(frame["run_id"]))
        mlflow_page(driver, f"{args.mlflow}/#/compare-runs?runs={ids}&experiments={experiment}")
        for element in driver.find_elements(By.XPATH,
                                            "//*[normalize-space(text())='Parameters']"):
            driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", element)
        time.sleep(1)
        driver.save_screenshot(str(out / "mlflow-compare-params.png"))

        # the answers table of the last evaluation
        evaluation = mlflow.search_runs(experiment_names=["rlhf-tuning"],
                                        filter_string="tags.`rlhf.step` = 'gate'",
                                        order_by=["start_time DESC"], max_results=1).iloc[0]
        mlflow_page(driver, f"{args.mlflow}/#/experiments/{evaluation['experiment_id']}/runs/"
                            f"{evaluation['run_id']}/artifacts/panel/answers.json")
        driver.save_screenshot(str(out / "mlflow-answers-table.png"))
        genai_views(driver, args.mlflow, out)
    finally:
        driver.quit()
    notification(out)
    print("\n".join(str(p) for p in sorted(out.glob("*.png"))))


def genai_views(driver, mlflow_url: str, out: Path) -> None:
    """The last gate's panel in MLflow's GenAI views: its evaluation runs (one per model,
    ``panel_majority/mean`` the pass rate) and the candidate's traces with the feedback."""
    import mlflow

    mlflow.set_tracking_uri(mlflow_url)
    gate = mlflow.search_runs(experiment_names=["rlhf-tuning"],
                              filter_string="tags.`rlhf.step` = 'gate'",
                              order_by=["start_time DESC"], max_results=1).iloc[0]
    experiment = gate["experiment_id"]
    views = mlflow.search_runs(
        experiment_ids=[experiment],
        filter_string=f"tags.`rlhf.panel.batch_id` = '{gate['tags.panel.batch_id']}'")
    # MLflow's "Evaluation runs" page: one run per model of the batch
    mlflow_page(driver, f"{mlflow_url}/#/experiments/{experiment}/evaluation-runs")
    driver.save_screenshot(str(out / "mlflow-evaluation-runs.png"))
    # the candidate's evaluation: its answers (traces) with the scorers and the feedback
    candidate = views[views["tags.rlhf.panel.model"] == "rlhf"].iloc[0]["run_id"]
    mlflow_page(driver, f"{mlflow_url}/#/experiments/{experiment}/evaluation-runs/{candidate}"
                        "/traces")
    driver.save_screenshot(str(out / "mlflow-evaluation-traces.png"))


def notification(out: Path) -> None:
    """The last demo run's gate decision as a mail: its gate.json as the gate task's
    result, the real notifier, a real SMTP server (aiosmtpd) on this machine, the message
    rendered as a mail client would."""
    import sys
    from types import SimpleNamespace

    sys.path[:0] = [str(ROOT / "plugins"), str(ROOT / "tests")]
    from airflow.sdk import DAG
    from conftest import smtp_connection, smtp_server

    from rlhf_airflow.notifications.rlhf import gate_decision

    gate_file = max((ROOT / ".rlhf" / "artifacts" / "rlhf_tuning").glob("*/gate/gate.json"),
                    key=lambda p: p.stat().st_mtime)
    gate = json.loads(gate_file.read_text())
    import mlflow

    run_url = os.environ.get("RLHF_MLFLOW_UI_URL", "http://localhost:5000").rstrip("/")
    experiment = mlflow.get_run(gate["mlflow_run_id"]).info.experiment_id
    run_url += f"/#/experiments/{experiment}/runs/{gate['mlflow_run_id']}"
    result = {"decision": gate["decision"], "version": gate["version"],
              "pass_rates": {r["model"]: r["pass_rate"] for r in gate["table"]},
              "reasons": gate["gate"]["reasons"], "mlflow_run_id": gate["mlflow_run_id"],
              "mlflow_run_url": run_url,
              "report_url": f"{run_url}/artifacts/panel/report.html"}
    ti = SimpleNamespace(task_id="gate",
                         xcom_pull=lambda task_ids: result if task_ids == "gate" else None)
    context = {"ti": ti, "run_id": gate_file.parts[-3], "dag": DAG(
        "rlhf_tuning", schedule=None)}
    with smtp_server() as (port, mails):
        os.environ["AIRFLOW_CONN_RLHF_NOTIFICATIONS"] = smtp_connection(port)
        gate_decision()(context)
    mail = mails[0]
    page = out / "notification.html"
    page.write_text(f"""<html><body style="font-family: sans-serif; margin: 24px">
<div style="border: 1px solid #ccc; border-radius: 6px; padding: 16px; max-width: 900px">
<div style="color: #555">From: {mail['from']}<br>To: {', '.join(mail['to'])}</div>
<h3>{mail['subject']}</h3>{mail['body']}</div></body></html>""")
    driver = browser(1000, 420)
    try:
        driver.get(page.as_uri())
        time.sleep(1)
        driver.save_screenshot(str(out / "notification-mail.png"))
    finally:
        driver.quit()
        page.unlink()


if __name__ == "__main__":
    main()
