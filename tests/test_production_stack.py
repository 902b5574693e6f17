"""Production mode on this machine: Airflow's metadata DB, MLflow's backend store (an
MLflow tracking server) and the verdict store on the local PostgreSQL; data, the
foundation model, run artifacts and MLflow's artifacts on an S3 API over HTTP (moto's
server); the demo DAG end to end with the local backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_e2e_dag import airflow_env, run_config

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def _upload_dir(s3, local: Path, bucket: str, prefix: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import httpx

    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, "the server exited"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer")


def test_production_mode_end_to_end(demo_model_dir, tmp_path, s3_endpoint, postgres_database):
    import boto3
    import mlflow
    import sqlalchemy
    import yaml

    from conftest import free_port

    airflow_db, mlflow_db, panel_db = (postgres_database(p) for p in
                                       ("rlhf_airflow", "rlhf_mlflow", "rlhf_panel"))
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for bucket in ("rlhf-data", "rlhf-artifacts", "mlflow-artifacts"):
        s3.create_bucket(Bucket=bucket)
    for name in ("preferences.jsonl", "prompts.jsonl", "eval.jsonl"):
        s3.upload_file(str(demo_model_dir / name), "rlhf-data", f"demo/{name}")
    _upload_dir(s3, demo_model_dir / "foundation", "rlhf-data", "demo/foundation")

    port = free_port()
    server_env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    mlflow_server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", mlflow_db,
         "--artifacts-destination", "s3://mlflow-artifacts", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        env=server_env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "mlflow.log", "w"))
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", mlflow_server)
        config = run_config(tmp_path, demo_model_dir, panel={"store_url": panel_db})
        raw = yaml.safe_load(config.read_text())
        raw["model"]["base_model"] = "s3://rlhf-data/demo/foundation"
        raw["data"].update(preference_uri="s3://rlhf-data/demo/preferences.jsonl",
                           prompt_uri="s3://rlhf-data/demo/prompts.jsonl",
                           eval_uri="s3://rlhf-data/demo/eval.jsonl", sft_uri=None)
        raw["storage"] = {"artifact_root": "s3://rlhf-artifacts/runs",
                          "allowed_roots": ["s3://rlhf-data/demo"],
                          "s3_endpoint_url": s3_endpoint, "s3_region": "us-east-1"}
        raw["tracking"] = {"tracking_uri": f"http://127.0.0.1:{port}"}
        config.write_text(yaml.safe_dump(raw))

        home = tmp_path / "airflow"
        home.mkdir()
        # every process finds the S3 API the way boto3 does: the run's config.json is
        # on S3 too, and must be readable before its storage.s3_endpoint_url is known
        env = {**airflow_env(home), "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": airflow_db,
               "AWS_ENDPOINT_URL_S3": s3_endpoint}
        migrate = subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env,
                                 capture_output=True, text=True, timeout=600)
        assert migrate.returncode == 0, migrate.stderr[-3000:]
        started = time.perf_counter()
        proc = subprocess.run([str(BIN / "airflow"), "dags", "test", "rlhf_tuning", "-c",
                               json.dumps({"config_file": str(config)})], env=env, cwd=home,
                              capture_output=True, text=True, timeout=900)
        seconds = time.perf_counter() - started
        log = proc.stdout + proc.stderr
        (tmp_path / "dags_test.log").write_text(log)
        problems = [ln for ln in log.splitlines() if "rlhf: " in ln or "exited with code" in ln]
        assert proc.returncode == 0, "\n".join(problems[-20:]) or log[-6000:]
        print(f"\nproduction-mode DAG run (airflow dags test): {seconds:.0f} s")
        (tmp_path / "seconds.txt").write_text(f"{seconds:.1f}")

        # Airflow's metadata DB is PostgreSQL: the run and its task states are there
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
        steps = set(runs["tags.rlhf.step"].dropna())
        assert {"reward", "ppo", "evaluate", "gate"} <= steps
        mlflow_keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow-artifacts")
                       .get("Contents", [])]
        assert any(k.endswith("panel/report.html") for k in mlflow_keys)
        version = mlflow.MlflowClient().search_model_versions("name = 'resume-assistant'")[0]
        assert version.source.startswith("s3://rlhf-artifacts/runs/rlhf_tuning/")
        assert version.tags["gate.decision"] == "reject"  # run_config's unreachable bar
        # the verdict store is PostgreSQL
        engine = sqlalchemy.create_engine(panel_db)
        with engine.connect() as conn:
            verdicts = conn.execute(sqlalchemy.text("select count(*) from verdicts")).scalar_one()
        engine.dispose()
        assert verdicts == 80 * 3
    finally:
        mlflow_server.terminate()
        mlflow_server.wait(30)
