"""Production mode on this machine, with a human panel, triggered the way the UI does.

Airflow runs as on several machines: api-server, scheduler (CeleryExecutor, the local Redis
as broker), dag-processor, triggerer and two Celery workers, one for the ``gpu`` queue
(the heavy steps) and one for ``default`` (bookkeeping); its metadata DB (and Celery's
result backend) on the local PostgreSQL, like MLflow's backend store (an
MLflow tracking server) and the verdict store; the data, the foundation model, the run
artifacts and MLflow's artifacts on an S3 API over HTTP (moto's server).  Notifications
go to a real SMTP server.

Run 1 is triggered through the REST API with form values.  The DAG defers at
``wait_for_panel`` and the panel is mailed; three reviewers, each with their own token,
judge the blinded items through the standalone review app over HTTP; the sequential panel
decides after three of six prompts, serves nobody anything more (the third reviewer gets
nothing) and releases the gate, which decides to promote (a lenient policy) and reports the
verdicts against a fixed panel's and the experts' measured time; the named approver signs off through
Airflow's HITL REST API (which refuses anyone else); the champion alias moves, and its
Asset event runs ``rlhf_deploy_champion``, which smoke-tests the champion.  Run 2, with
another ``kl_coeff`` and broken eval data, fails and is mailed; MLflow finds both runs
by that param.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, review_server, smtp_connection, smtp_server, wait_http
from test_e2e_dag import airflow_env, run_config

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def _upload_dir(s3, local: Path, bucket: str, prefix: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")


def _review(http, tokens: dict[str, str], batch_id: str, passes) -> int:
    """Each reviewer in turn judges over the REST API until the app has nothing more for
    them (204); ``passes(item)`` is the verdict.  Returns the verdicts given."""
    given = 0
    for name, token in tokens.items():
        headers = {"Authorization": f"Bearer {token}"}
        while (response := http.get(f"api/batches/{batch_id}/next",
                                    headers=headers)).status_code != 204:
            item = response.json()
            assert "model" not in item
            posted = http.post(f"api/items/{item['id']}/verdict", headers=headers,
                               json={"passed": passes(item), "comment": ""})
            assert posted.status_code == 201, posted.text
            given += 1
    return given


def _sign_off(api: str, users: dict, run_id: str, proc_ok, scheduler_log: Path,
              deadline_s: float = 600) -> None:
    """alice answers the sign-off request; bob (an admin, not the approver) may not."""
    import httpx

    hitl = f"{api}/api/v2/dags/rlhf_tuning/dagRuns/{run_id}/taskInstances/sign_off/-1/hitlDetails"
    deadline = time.time() + deadline_s
    while (detail := httpx.get(hitl, headers=users["alice"])).status_code != 200:
        proc_ok()
        assert time.time() < deadline, "no sign-off request"
        time.sleep(2)
    # a person answers a request that waits, seconds or hours after it was made. Airflow 3.3.2
    # loses the resumed task when the answer comes before the scheduler has taken in the exit
    # of the worker that parked it (that exit then reads as a task killed externally; see
    # docs/ARCHITECTURE.md), so alice answers once the scheduler logged that exit
    parked = f"task_id=sign_off, run_id={run_id},"
    while not any(parked in line and "TaskInstance Finished" in line
                  for line in scheduler_log.read_text().splitlines()):
        proc_ok()
        assert time.time() < deadline, "the sign-off request never waited"
        time.sleep(1)
    assert detail.json()["assigned_users"] == [{"id": "alice", "name": "alice"}]
    # the request shows the gate's pass rates as percentages, and links a person can open:
    # the gate's MLflow run, its report there, the review page; no artifact path
    body = detail.json()["body"]
    assert body.startswith("Expert pass rates: rlhf ") and "%." in body, body
    mlflow_run = re.search(r"MLflow run: (http://\S+/#/experiments/\d+/runs/[0-9a-f]{32})\n",
                           body)
    assert mlflow_run, body
    assert f"Report: {mlflow_run.group(1)}/artifacts/panel/report.html\n" in body, body
    assert re.search(r"Review page: http://\S+/rlhf-review/", body), body
    assert "s3://" not in body, body
    answer = {"chosen_options": ["Approve"]}
    assert httpx.patch(hitl, json=answer, headers=users["bob"]).status_code == 403
    approved = httpx.patch(hitl, json=answer, headers=users["alice"])
    assert approved.status_code == 200, approved.text


REDIS_DB = 11  # the broker's database on the local Redis, emptied for each test


@contextlib.contextmanager
def airflow_services(home: Path, tmp_path: Path, env: dict, users: str):
    """Airflow as it runs on several machines: api-server, scheduler (CeleryExecutor: the
    local Redis as the broker, the metadata PostgreSQL as Celery's result backend),
    dag-processor, triggerer, and two Celery workers, one serving the ``gpu`` queue (the
    heavy steps) and one the ``default`` queue (bookkeeping); yields (base URL,
    {user: headers}, a check that every component still runs).  The service user
    ``rlhf-bot`` (role op, a password the admin chose) is the connection that writes run
    notes."""
    import secrets

    import httpx
    import redis

    redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    passwords = tmp_path / "passwords.json"
    bot_password = secrets.token_urlsafe(12)
    passwords.write_text(json.dumps({"rlhf-bot": bot_password}))
    users += ",rlhf-bot:op"
    metadata = env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    env = {**airflow_env(home), **env, "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
           # the DAG files do not change during the test: parsed once, not every 30 s
           "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "600",
           "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
           "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{metadata}",
           "RLHF_GPU_QUEUE": "gpu",
           "AIRFLOW_CONN_RLHF_AIRFLOW_API": json.dumps({
               "conn_type": "http", "host": base, "login": "rlhf-bot",
               "password": bot_password}),
           "AIRFLOW__API__PORT": str(port), "AIRFLOW__API__BASE_URL": base,
           "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base}/execution/",
           "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16),
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": users,
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords)}
    # two workers on one machine, as two machines would run them: a queue, a name and a
    # log server port each
    workers = {f"worker-{queue}": (["celery", "worker", "--queues", queue, "--concurrency",
                                    str(slots), "--celery-hostname", f"{queue}@%h"],
                                   {"AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())})
               for queue, slots in (("gpu", 1), ("default", 2))}
    components = {"api-server": (["api-server", "--port", str(port)], {}),
                  "scheduler": (["scheduler"], {}), "dag-processor": (["dag-processor"], {}),
                  "triggerer": (["triggerer"], {}), **workers}
    # each component in a process group of its own: stopping it stops what it forked too
    # (a Celery worker's pool and log server would otherwise outlive the test)
    procs = {name: subprocess.Popen([str(BIN / "airflow"), *argv], env={**env, **extra},
                                    cwd=home, stdout=open(tmp_path / f"{name}.log", "w"),
                                    stderr=subprocess.STDOUT, start_new_session=True)
             for name, (argv, extra) in components.items()}

    def running() -> None:
        for name, proc in procs.items():
            assert proc.poll() is None, (name, (tmp_path / f"{name}.log").read_text()[-3000:])

    try:
        wait_http(f"{base}/api/v2/monitor/health", procs["api-server"])
        headers = {}
        for user, password in json.loads(passwords.read_text()).items():
            token = httpx.post(f"{base}/auth/token", json={"username": user,
                                                           "password": password}).json()
            headers[user] = {"Authorization": f"Bearer {token['access_token']}"}
        yield base, headers, running
    finally:
        import signal

        def signal_group(proc, sig) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)

        for proc in procs.values():
            signal_group(proc, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        time.sleep(2)
        for proc in procs.values():  # whatever the group left behind
            signal_group(proc, signal.SIGKILL)


def _wait_run(api: str, headers: dict, dag_id: str, run_id: str, running,
              states=("success", "failed"), deadline_s: float = 900) -> str:
    import httpx

    deadline = time.monotonic() + deadline_s
    while True:
        state = httpx.get(f"{api}/api/v2/dags/{dag_id}/dagRuns/{run_id}",
                          headers=headers).json()["state"]
        if state in states:
            return state
        running()
        assert time.monotonic() < deadline, f"{dag_id} {run_id} still {state}"
        time.sleep(2)


def _failure_report(home: Path, tmp_path: Path, dag_id: str, run_id: str) -> str:
    """What a failed run left behind: the tail of every task log of the run and the
    scheduler's lines about task states, so that a failure on CI explains itself."""
    parts = []
    for log in sorted((home / "logs" / f"dag_id={dag_id}").glob(f"run_id={run_id}/*/*.log")):
        parts.append(f"--- {log.parent.name}/{log.name}\n" + log.read_text()[-1500:])
    scheduler = (tmp_path / "scheduler.log").read_text().splitlines()
    keys = ("state mismatch", "reported that", "ERROR", "Marking task")
    notable = [line for line in scheduler if any(k in line for k in keys)]
    parts.append("--- scheduler\n" + "\n".join(notable[-40:]))
    return "\n".join(parts)[-12000:]


@pytest.fixture()
def s3_endpoint(tmp_path, monkeypatch):
    """moto's S3 server in a process of its own, as a real S3 service is: not a thread of
    the test process, whose interpreter lock it would share with whatever the suite left
    running there (every S3 call of the pipeline goes through it)."""
    port = free_port()
    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(key, value)
    server = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / "moto.log", "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/moto-api/", server, timeout=60)
        yield url
    finally:
        server.terminate()
        server.wait(30)


def test_production_mode_with_a_human_panel(demo_model_dir, tmp_path, s3_endpoint,
                                            postgres_database):
    import boto3
    import httpx
    import mlflow
    import yaml

    from rlhf_tasks.panel.store import PanelStore

    airflow_db, mlflow_db, panel_db = (postgres_database(p) for p in
                                       ("rlhf_airflow", "rlhf_mlflow", "rlhf_panel"))
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for bucket in ("rlhf-data", "rlhf-artifacts", "mlflow-artifacts"):
        s3.create_bucket(Bucket=bucket)
    for name in ("preferences.jsonl", "prompts.jsonl", "eval.jsonl"):
        s3.upload_file(str(demo_model_dir / name), "rlhf-data", f"demo/{name}")
    s3.put_object(Bucket="rlhf-data", Key="demo/preferences-broken.jsonl",
                  Body=b'{"prompt": ""}\n{"no_prompt": 1}\n')
    _upload_dir(s3, demo_model_dir / "foundation", "rlhf-data", "demo/foundation")

    port = free_port()
    mlflow_uri = f"http://127.0.0.1:{port}"
    mlflow_server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", mlflow_db,
         "--artifacts-destination", "s3://mlflow-artifacts", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        # no job runner: its ten huey consumers serve MLflow's online judges, which the
        # pipeline does not use, and would take CPU from the run under test
        env={**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
             "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "mlflow.log", "w"))
    store = PanelStore(panel_db)
    tokens = {name: store.add_reviewer(name) for name in ("ann", "cara", "dan")}
    # bob is on the panel too, but he triggers run 1: its batch is not his to judge
    bob_token = store.add_reviewer("bob")
    try:
        wait_http(f"{mlflow_uri}/health", mlflow_server, timeout=120)
        # people, k = 2, a sequential panel: the candidate against the foundation model
        # under a lenient policy (significance 0.99: the early look needs E >= 2.02), so
        # reviewers who prefer the candidate settle it early and the sign-off is asked
        config = run_config(tmp_path, demo_model_dir, panel={
            "mode": "human", "verdicts_per_item": 2, "poll_seconds": 1, "store_url": panel_db,
            "pass_rate_threshold": 0.0, "min_lift": -1.0, "significance": 0.99,
            "approver": "alice", "sequential": True, "sequential_min_prompts": 2})
        raw = yaml.safe_load(config.read_text())
        raw["model"]["base_model"] = "s3://rlhf-data/demo/foundation"
        raw["data"].update(preference_uri="s3://rlhf-data/demo/preferences.jsonl",
                           prompt_uri="s3://rlhf-data/demo/prompts.jsonl",
                           eval_uri="s3://rlhf-data/demo/eval.jsonl", sft_uri=None)
        raw["evaluation"].update(max_prompts=6, baselines=["foundation"], smoke_prompts=3)
        raw["storage"] = {"artifact_root": "s3://rlhf-artifacts/runs",
                          "allowed_roots": ["s3://rlhf-data/demo"],
                          "s3_endpoint_url": s3_endpoint, "s3_region": "us-east-1"}
        raw["tracking"] = {"tracking_uri": mlflow_uri}
        config.write_text(yaml.safe_dump(raw))

        home = tmp_path / "airflow"
        home.mkdir()
        # every process finds the S3 API the way boto3 does: the run's config.json is
        # on S3 too, and must be readable before its storage.s3_endpoint_url is known
        db_env = {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": airflow_db,
                  "AWS_ENDPOINT_URL_S3": s3_endpoint, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
                  "RLHF_CONFIG_DIR": str(tmp_path), "RLHF_BASE_CONFIG": str(config)}
        migrate = subprocess.run([str(BIN / "airflow"), "db", "migrate"],
                                 env={**airflow_env(home), **db_env},
                                 capture_output=True, text=True, timeout=600)
        assert migrate.returncode == 0, migrate.stderr[-3000:]

        with smtp_server() as (smtp_port, mails), airflow_services(
                home, tmp_path, {**db_env, "AIRFLOW_CONN_RLHF_NOTIFICATIONS":
                                 smtp_connection(smtp_port)},
                "alice:user,bob:admin") as (api, users, running):
            bob = users["bob"]
            started = time.perf_counter()
            # the GPU steps' pool, as an admin sets it up
            pool = httpx.post(f"{api}/api/v2/pools", headers=bob, json={
                "name": "gpu", "slots": 1, "description": "GPU steps"})
            assert pool.status_code == 201, pool.text
            deadline = time.monotonic() + 300
            while httpx.get(f"{api}/api/v2/dags/rlhf_tuning", headers=bob).status_code != 200:
                running()
                assert time.monotonic() < deadline, "the DAGs were never parsed"
                time.sleep(1)
            for dag_id in ("rlhf_tuning", "rlhf_deploy_champion"):
                unpaused = httpx.patch(f"{api}/api/v2/dags/{dag_id}", json={"is_paused": False},
                                       headers=bob)
                assert unpaused.status_code == 200, unpaused.text

            # run 1, triggered as the UI does (REST API, the form's values in conf) by bob
            trigger = f"{api}/api/v2/dags/rlhf_tuning/dagRuns"
            form = {"config_file": str(config), "kl_coeff": 0.1}
            created = httpx.post(trigger, json={"logical_date": None, "conf": form},
                                 headers=bob)
            assert created.status_code == 200, created.text
            run_1 = created.json()["dag_run_id"]
            with review_server(store) as base, \
                    httpx.Client(base_url=base, timeout=30) as http:
                ann = {"Authorization": f"Bearer {tokens['ann']}"}
                deadline = time.monotonic() + 900  # conditions, with generous bounds
                while not (batches := http.get("api/batches", headers=ann).json()):
                    running()
                    assert time.monotonic() < deadline, "no review batch"
                    time.sleep(2)
                batch = batches[0]
                assert batch["items"] == 12 and not batch["simulated"]
                # the panel is told: the review page and the quorum it needs
                while not any("review batch waiting" in m["subject"] for m in mails):
                    running()
                    assert time.monotonic() < deadline, "nobody told the panel"
                    time.sleep(1)
                waiting = next(m for m in mails if "review batch waiting" in m["subject"])
                assert f"{api}/rlhf-review/" in waiting["body"]
                assert "12 answers, 2 verdicts each (24 in all)" in waiting["body"]
                assert "A sequential panel" in waiting["body"]
                state = httpx.get(f"{api}/api/v2/dags/rlhf_tuning/dagRuns/{run_1}",
                                  headers=bob).json()["state"]
                assert state == "running", "the run must wait for the panel"
                assert http.get(f"api/batches/{batch['id']}/next").status_code == 401
                assert http.get(f"api/batches/{batch['id']}/next", headers={
                    "Authorization": f"Bearer {bob_token}"}).status_code == 403
                # the experts prefer the candidate (the test reads the store's server
                # side for it): ann judges all 12 answers, one verdict settles a fail
                # (k = 2), cara's second passes settle prompt after prompt, and after the
                # third prompt (E(3, 0) = 2.6 >= 2.02) the panel has decided: nothing more
                # is served, dan gets none, half the prompts stay unjudged
                models = {i["id"]: i["model"] for i in store.items(batch["id"], with_model=True)}
                given = _review(http, tokens, batch["id"], lambda i: models[i["id"]] == "rlhf")
                assert given == 15
                progress = http.get(f"api/batches/{batch['id']}/progress", headers=ann).json()
                assert progress["complete"] and progress["sequential"]["look"] == "early"
                assert progress["sequential"]["prompts_decided"] == 3
                assert (progress["sequential"]["verdicts_used"],
                        progress["sequential"]["verdicts_fixed"]) == (15, 24)
            _sign_off(api, users, run_1, running, tmp_path / "scheduler.log")
            state = _wait_run(api, bob, "rlhf_tuning", run_1, running)
            assert state == "success", _failure_report(home, tmp_path, "rlhf_tuning", run_1)
            print(f"\nproduction-mode run with a human panel (REST API, scheduler): "
                  f"{time.perf_counter() - started:.0f} s")
            tis = {t["task_id"]: t for t in httpx.get(
                f"{trigger}/{run_1}/taskInstances", headers=bob).json()["task_instances"]}
            states = {task: ti["state"] for task, ti in tis.items()}
            print("task seconds: " + ", ".join(
                f"{task} {ti['duration']:.0f}" for task, ti in sorted(
                    tis.items(), key=lambda kv: kv[1]["start_date"] or "")
                if ti.get("duration") is not None))
            assert states["panel_simulate"] == "skipped", states
            for task in ("wait_for_panel", "gate", "sign_off", "finish_tracking"):
                assert states[task] == "success", (task, states)
            # the approval never left Airflow's record: sign_off promoted itself
            assert states["promote"] == "skipped", states
            # the run's note holds the headline
            note = httpx.get(f"{trigger}/{run_1}", headers=bob).json()["note"]
            assert note.startswith("promote: version 1; expert pass rates "), note
            subjects = [m["subject"] for m in mails]
            assert any("gate decided promote" in s for s in subjects), subjects
            assert any("sign-off waiting" in s for s in subjects), subjects
            # the run's one candidate is the mapped task tune's index 0
            links = {task: httpx.get(f"{trigger}/{run_1}/taskInstances/{task}/links",
                                     params={"map_index": index},
                                     headers=bob).json()["extra_links"]
                     for task, index in (("reward", -1), ("tune", 0), ("gate", -1))}

            # the promotion's Asset event runs the deployment template, which passes
            deadline = time.monotonic() + 600
            while not (deploys := httpx.get(
                    f"{api}/api/v2/dags/rlhf_deploy_champion/dagRuns",
                    headers=bob).json()["dag_runs"]):
                running()
                assert time.monotonic() < deadline, "the champion Asset triggered nothing"
                time.sleep(2)
            deploy = deploys[0]
            assert deploy["run_type"] == "asset_triggered"
            assert _wait_run(api, bob, "rlhf_deploy_champion", deploy["dag_run_id"],
                             running) == "success"
            # the heavy steps ran on the gpu queue's worker, the bookkeeping on the other
            ran = {queue: set(re.findall(r"Executing workload in Celery: .*?task_id='([^']+)'",
                                         (tmp_path / f"worker-{queue}.log").read_text()))
                   for queue in ("gpu", "default")}
            assert ran["gpu"] == {"reward", "tune", "evaluate", "smoke_test"}, ran
            assert ran["default"] >= {"prepare_run", "validate.preference", "gate",
                                      "sign_off", "announced"}, ran
            assert not ran["gpu"] & ran["default"], ran
            assert {t: tis[t]["queue"] for t in ("reward", "gate")} == {"reward": "gpu",
                                                                       "gate": "default"}

            # run 2: another kl_coeff and broken preference data; it fails, and the team is
            # told
            created = httpx.post(trigger, headers=bob, json={"logical_date": None, "conf": {
                **form, "kl_coeff": 0.2,
                "preference_dataset": "s3://rlhf-data/demo/preferences-broken.jsonl"}})
            assert created.status_code == 200, created.text
            run_2 = created.json()["dag_run_id"]
            assert _wait_run(api, bob, "rlhf_tuning", run_2, running) == "failed"
            failed = {t["task_id"]: t for t in httpx.get(
                f"{trigger}/{run_2}/taskInstances", headers=bob).json()["task_instances"]}
            assert failed["validate.preference"]["state"] == "failed"
            assert failed["validate.preference"]["try_number"] == 1, "bad input is not retried"
            assert failed["abort_tracking"]["state"] == "success"
            deadline = time.monotonic() + 60
            while not any("failed at validate.preference" in m["subject"] for m in mails):
                assert time.monotonic() < deadline, [m["subject"] for m in mails]
                time.sleep(1)

        # MLflow (PostgreSQL backend, artifacts on S3): runs are searchable by setting
        mlflow.set_tracking_uri(mlflow_uri)
        mlflow.set_experiment("rlhf-tuning")
        found = {kl: mlflow.search_runs(filter_string=f"params.`ppo.kl_coef` = '{kl}' and "
                                                      "tags.`rlhf.step` = 'ppo'")
                 for kl in ("0.1", "0.2")}
        assert len(found["0.1"]) == 1 and found["0.2"].empty  # run 2 never reached PPO
        parents = {kl: mlflow.search_runs(filter_string=f"params.`ppo.kl_coef` = '{kl}' and "
                                                        "attributes.run_name LIKE 'rlhf_tuning:%'")
                   for kl in ("0.1", "0.2")}
        assert parents["0.1"].iloc[0]["status"] == "FINISHED"
        assert parents["0.2"].iloc[0]["status"] == "FAILED"
        assert parents["0.2"].iloc[0]["params.data.preference_uri"].endswith(
            "preferences-broken.jsonl")
        runs = mlflow.search_runs()
        step_run = {s: r for s, r in zip(runs["tags.rlhf.step"], runs["run_id"]) if s}
        for task, run_id in ((t, step_run[s]) for t, s in (("reward", "reward"), ("tune", "ppo"),
                                                           ("gate", "gate"))):
            assert links[task]["MLflow run"].endswith(f"/runs/{run_id}"), (task, links[task])
            assert links[task]["MLflow run"].startswith(mlflow_uri)
        judged = mlflow.load_table("panel/answers.json", run_ids=[step_run["gate"]])
        assert len(judged) == 12 and (judged["passes"] + judged["fails"]).sum() == 15

        client = mlflow.MlflowClient()
        # the closed panel in MLflow's GenAI views: per model an evaluation run whose pass
        # rate is the gate's, the answers as traces with each reviewer's HUMAN feedback
        views = mlflow.search_runs(filter_string="tags.`rlhf.panel.view_complete` = 'true'")
        gate_metrics = client.get_run(step_run["gate"]).data.metrics
        assert sorted(views["tags.rlhf.panel.model"]) == ["foundation", "rlhf"]
        for model, rate in zip(views["tags.rlhf.panel.model"],
                               views["metrics.panel_majority/mean"]):
            assert rate == pytest.approx(gate_metrics[f"panel/{model}/pass_rate"]), model
        assert set(views["tags.mlflow.runType"]) == {"genai_evaluate"}
        experiment = mlflow.get_experiment_by_name("rlhf-tuning").experiment_id
        traces = mlflow.search_traces(locations=[experiment], return_type="list")
        assert sorted((t.info.tags["rlhf.model"], t.info.tags["rlhf.prompt_index"])
                      for t in traces) == sorted((m, str(i)) for m, i in zip(
                          judged["model"], judged["prompt_index"]))
        human = [a for t in traces for a in t.info.assessments if a.name == "expert_pass"]
        assert len(human) == 15 and {a.source.source_type for a in human} == {"HUMAN"}
        assert {a.source.source_id for a in human} == {"ann", "cara"}
        # the experts' time, measured from serving to verdict, per reviewer
        assert gate_metrics["panel/expert_seconds_timed_verdicts"] == 15
        assert (gate_metrics["panel/sequential/verdicts_used"],
                gate_metrics["panel/sequential/verdicts_fixed"]) == (15, 24)
        assert gate_metrics["panel/expert_seconds_total"] >= 0
        assert {k.rsplit("/", 1)[1] for k in gate_metrics
                if k.startswith("panel/expert_seconds_reviewer/")} == {"ann", "cara"}
        # and priced in the benefit-and-cost figures (the demo's prices)
        assert gate_metrics["cost/panel_hours"] == pytest.approx(
            gate_metrics["panel/expert_seconds_total"] / 3600)
        assert gate_metrics["cost/evaluation"] > 0
        champion = client.get_model_version_by_alias("resume-assistant", "champion")
        assert champion.source.startswith("s3://rlhf-artifacts/runs/rlhf_tuning/")
        assert champion.tags["gate.decision"] == "promote"
        assert champion.tags["gate.signed_off_by"] == "alice"
        assert champion.tags["panel.simulated"] == "false"
        assert champion.tags["panel.reviewers"] == "2"
        assert client.get_model_version_by_alias("resume-assistant-reward", "champion")
        assert champion.source.endswith("/ppo/served")
        # artifacts are in S3, each step folder whole (manifest last)
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket="rlhf-artifacts", Prefix="runs/rlhf_tuning/") for o in page.get("Contents", [])]
        for step in ("validate_preference", "reward/model", "ppo/model", "evaluate", "gate"):
            assert any(k.endswith(f"/{step}/MANIFEST.json") for k in keys), step
        mlflow_keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow-artifacts")
                       .get("Contents", [])]
        assert any(k.endswith("panel/report.html") for k in mlflow_keys)
        # the gate's report: the experts' measured time and the benefit-and-cost table
        report_key = next(k for k in keys if k.endswith("/gate/report.html"))
        report = s3.get_object(Bucket="rlhf-artifacts", Key=report_key)["Body"].read().decode()
        assert "<h2>Expert time</h2>" in report and "15 timed verdicts (15 measured" in report
        assert ("Sequential panel: decided at the early look after 3 of 6 prompts" in report
                and "took 15 verdicts, a fixed panel would have taken 24" in report)
        assert "<h2>Benefit and cost</h2>" in report and "measured panel time" in report
        # the verdict store is PostgreSQL: every verdict, with who gave it
        rows = store.verdict_rows(batch["id"])
        assert {r["reviewer"] for r in rows} == {"ann", "cara"} and len(rows) == 15
        assert {r["source"] for r in rows} == {"api"}
    finally:
        store.dispose()
        mlflow_server.terminate()
        mlflow_server.wait(30)
