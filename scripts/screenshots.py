"""README screenshots in a real headless browser (Debian's chromium through selenium).

Run while `make airflow` is up, after at least two `make demo` runs:
    .venv/bin/python scripts/screenshots.py [--out docs/img]
Takes: the DAG's trigger form, a run's graph, the review page in the Airflow UI, and
MLflow's comparison of the last two PPO runs.
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "docs" / "img"))
    parser.add_argument("--airflow", default="http://localhost:8080")
    parser.add_argument("--mlflow", default="http://localhost:5000")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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
        driver.get(f"{args.mlflow}/#/compare-runs?runs={ids}&experiments={experiment}")
        time.sleep(6)
        # down to the metrics table: panel/* side by side for the two gates
        for element in driver.find_elements(By.XPATH, "//*[normalize-space(text())='Metrics']"):
            driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", element)
        time.sleep(1)
        driver.save_screenshot(str(out / "mlflow-compare-gates.png"))
    finally:
        driver.quit()
    print("\n".join(str(p) for p in sorted(out.glob("*.png"))))


if __name__ == "__main__":
    main()
