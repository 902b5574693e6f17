"""Production mode on this machine, with a human panel.

Airflow's metadata DB, MLflow's backend store (an MLflow tracking server) and the verdict
store on the local PostgreSQL; the data, the foundation model, the run artifacts and
MLflow's artifacts on an S3 API over HTTP (moto's server); the demo DAG end to end with
the local backend.  The panel is people: the DAG defers at ``wait_for_panel``; three
reviewers, each with their own token, judge the blinded items through the REST API of
the standalone review app over HTTP; quorum releases the gate, which decides to promote
(a lenient policy); the named approver signs off through Airflow's HITL REST API (which
refuses anyone else); the champion alias moves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
from conftest import free_port, review_server, wait_http
from test_e2e_dag import airflow_env, api_server, run_config, task_states

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def _upload_dir(s3, local: Path, bucket: str, prefix: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")


def _review(http, tokens: dict[str, str], batch_id: str, per_reviewer: int) -> int:
    """Each reviewer judges by the demo rubric, over the REST API; returns the verdicts."""
    from rlhf_tasks.demo import rubric

    given = 0
    for name, token in tokens.items():
        headers = {"Authorization": f"Bearer {token}"}
        for _ in range(per_reviewer):
            response = http.get(f"api/batches/{batch_id}/next", headers=headers)
            if response.status_code == 204:
                break
            item = response.json()
            assert "model" not in item
            verdict = rubric.judge(item["prompt"], item["response"])
            posted = http.post(f"api/items/{item['id']}/verdict", headers=headers,
                               json={"passed": verdict.passed,
                                     "comment": ", ".join(verdict.failed_checks)})
            assert posted.status_code == 201, posted.text
            given += 1
    return given


def _sign_off(api: str, users: dict, dag, deadline_s: float = 300) -> None:
    """alice answers the sign-off request; bob (an admin, not the approver) may not."""
    import httpx

    run_id = httpx.get(f"{api}/api/v2/dags/rlhf_tuning/dagRuns",
                       params={"order_by": "-start_date", "limit": 1},
                       headers=users["alice"]).json()["dag_runs"][0]["dag_run_id"]
    hitl = f"{api}/api/v2/dags/rlhf_tuning/dagRuns/{run_id}/taskInstances/sign_off/-1/hitlDetails"
    deadline = time.time() + deadline_s
    while (detail := httpx.get(hitl, headers=users["alice"])).status_code != 200:
        assert dag.poll() is None and time.time() < deadline, "no sign-off request"
        time.sleep(2)
    assert detail.json()["assigned_users"] == [{"id": "alice", "name": "alice"}]
    answer = {"chosen_options": ["Approve"]}
    assert httpx.patch(hitl, json=answer, headers=users["bob"]).status_code == 403
    approved = httpx.patch(hitl, json=answer, headers=users["alice"])
    assert approved.status_code == 200, approved.text


def test_production_mode_with_a_human_panel(demo_model_dir, tmp_path, s3_endpoint,
                                            postgres_database):
    import boto3
    import httpx
    import mlflow
    import sqlalchemy
    import yaml

    from rlhf_tasks.panel.store import PanelStore

    airflow_db, mlflow_db, panel_db = (postgres_database(p) for p in
                                       ("rlhf_airflow", "rlhf_mlflow", "rlhf_panel"))
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for bucket in ("rlhf-data", "rlhf-artifacts", "mlflow-artifacts"):
        s3.create_bucket(Bucket=bucket)
    for name in ("preferences.jsonl", "prompts.jsonl", "eval.jsonl"):
        s3.upload_file(str(demo_model_dir / name), "rlhf-data", f"demo/{name}")
    _upload_dir(s3, demo_model_dir / "foundation", "rlhf-data", "demo/foundation")

    port = free_port()
    mlflow_server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", mlflow_db,
         "--artifacts-destination", "s3://mlflow-artifacts", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        env={**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint},
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "mlflow.log", "w"))
    store = PanelStore(panel_db)
    tokens = {name: store.add_reviewer(name) for name in ("ann", "bob", "cara")}
    try:
        wait_http(f"http://127.0.0.1:{port}/health", mlflow_server, timeout=120)
        # people, k = 2; the candidate alone (no baseline) under a lenient policy, so the
        # gate promotes whatever the verdicts and the sign-off is asked every time
        config = run_config(tmp_path, demo_model_dir, panel={
            "mode": "human", "verdicts_per_item": 2, "poll_seconds": 1, "store_url": panel_db,
            "pass_rate_threshold": 0.0, "min_lift": -1.0, "significance": 0.99,
            "approver": "alice"})
        raw = yaml.safe_load(config.read_text())
        raw["model"]["base_model"] = "s3://rlhf-data/demo/foundation"
        raw["data"].update(preference_uri="s3://rlhf-data/demo/preferences.jsonl",
                           prompt_uri="s3://rlhf-data/demo/prompts.jsonl",
                           eval_uri="s3://rlhf-data/demo/eval.jsonl", sft_uri=None)
        raw["evaluation"].update(max_prompts=6, baselines=[])
        raw["storage"] = {"artifact_root": "s3://rlhf-artifacts/runs",
                          "allowed_roots": ["s3://rlhf-data/demo"],
                          "s3_endpoint_url": s3_endpoint, "s3_region": "us-east-1"}
        raw["tracking"] = {"tracking_uri": f"http://127.0.0.1:{port}"}
        config.write_text(yaml.safe_dump(raw))

        home = tmp_path / "airflow"
        home.mkdir()
        # every process finds the S3 API the way boto3 does: the run's config.json is
        # on S3 too, and must be readable before its storage.s3_endpoint_url is known
        db_env = {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": airflow_db,
                  "AWS_ENDPOINT_URL_S3": s3_endpoint, "RLHF_CONFIG_DIR": str(tmp_path),
                  "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "alice:user,bob:admin"}
        env = {**airflow_env(home), **db_env}
        migrate = subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env,
                                 capture_output=True, text=True, timeout=600)
        assert migrate.returncode == 0, migrate.stderr[-3000:]

        log_path = tmp_path / "dags_test.log"  # a file: nobody reads a pipe while we wait
        started = time.perf_counter()
        dag = subprocess.Popen([str(BIN / "airflow"), "dags", "test", "rlhf_tuning", "-c",
                                json.dumps({"config_file": str(config)})], env=env, cwd=home,
                               text=True, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
        try:
            with review_server(store) as base, \
                    httpx.Client(base_url=base, timeout=30) as http:
                ann = {"Authorization": f"Bearer {tokens['ann']}"}
                deadline = time.monotonic() + 900  # conditions, with generous bounds
                while not (batches := http.get("api/batches", headers=ann).json()):
                    assert dag.poll() is None, "the DAG ended before its review batch existed"
                    assert time.monotonic() < deadline, "no review batch"
                    time.sleep(2)
                batch = batches[0]
                assert batch["items"] == 6 and not batch["simulated"]
                # the run is waiting on the panel: its sensor has logged the wait
                while "waiting for the panel: 0 of 12 verdicts" not in log_path.read_text():
                    assert dag.poll() is None, "the DAG must wait for the panel"
                    assert time.monotonic() < deadline, "the panel wait never started"
                    time.sleep(1)
                assert dag.poll() is None, "the DAG must wait for the panel"
                assert http.get(f"api/batches/{batch['id']}/next").status_code == 401
                assert _review(http, tokens, batch["id"], per_reviewer=4) == 12
            with api_server(home, tmp_path, "alice:user,bob:admin", **{
                    k: v for k, v in db_env.items() if "SIMPLE_AUTH" not in k}) as (api, users):
                _sign_off(api, users, dag)
            dag.wait(timeout=600)
        finally:
            if dag.poll() is None:
                dag.kill()
        seconds = time.perf_counter() - started
        log = log_path.read_text()
        problems = [ln for ln in log.splitlines() if "rlhf: " in ln or "exited with code" in ln]
        assert dag.returncode == 0, "\n".join(problems[-20:]) or log[-6000:]
        print(f"\nproduction-mode DAG run with a human panel (airflow dags test): {seconds:.0f} s")
        assert "waiting for the panel: 0 of 12 verdicts" in log

        # Airflow's metadata DB is PostgreSQL: the run and its task states are there
        states = task_states(home, log, **db_env)
        assert states["panel_simulate"] == "skipped", states
        for task in ("wait_for_panel", "gate", "sign_off", "promote", "finish_tracking"):
            assert states[task] == "success", (task, states)
        engine = sqlalchemy.create_engine(airflow_db)
        with engine.connect() as conn:
            state = conn.execute(sqlalchemy.text(
                "select state from dag_run where dag_id = 'rlhf_tuning'")).scalar_one()
        engine.dispose()
        assert state == "success"
        # artifacts are in S3, each step folder whole (manifest last)
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket="rlhf-artifacts", Prefix="runs/rlhf_tuning/") for o in page.get("Contents", [])]
        for step in ("validate_preference", "reward/model", "ppo/model", "evaluate", "gate"):
            assert any(k.endswith(f"/{step}/MANIFEST.json") for k in keys), step
        # MLflow: the server (PostgreSQL backend) has the runs; its artifacts went to S3
        mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
        runs = mlflow.search_runs(experiment_names=["rlhf-tuning"])
        assert {"reward", "ppo", "evaluate", "gate"} <= set(runs["tags.rlhf.step"].dropna())
        mlflow_keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow-artifacts")
                       .get("Contents", [])]
        assert any(k.endswith("panel/report.html") for k in mlflow_keys)
        client = mlflow.MlflowClient()
        champion = client.get_model_version_by_alias("resume-assistant", "champion")
        assert champion.source.startswith("s3://rlhf-artifacts/runs/rlhf_tuning/")
        assert champion.tags["gate.decision"] == "promote"
        assert champion.tags["gate.signed_off_by"] == "alice"
        assert champion.tags["panel.simulated"] == "false"
        assert champion.tags["panel.reviewers"] == "3"
        assert client.get_model_version_by_alias("resume-assistant-reward", "champion")
        # the champion is an MLflow model, read back from S3 and answering through pyfunc
        assert champion.source.endswith("/ppo/served")
        with mock.patch.dict(os.environ, {"MLFLOW_S3_ENDPOINT_URL": s3_endpoint}):
            served = mlflow.pyfunc.load_model("models:/resume-assistant@champion")
        assert isinstance(served.predict(["Rewrite: helped with payroll"])[0], str)
        # the verdict store is PostgreSQL: every verdict, with who gave it
        rows = store.verdict_rows(batch["id"])
        assert {r["reviewer"] for r in rows} == {"ann", "bob", "cara"} and len(rows) == 12
        assert {r["source"] for r in rows} == {"api"}
    finally:
        store.dispose()
        mlflow_server.terminate()
        mlflow_server.wait(30)
