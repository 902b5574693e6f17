"""End to end: the real DAG under `airflow dags test` on the demo data (embedded defaults)."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def airflow_env(home: Path) -> dict:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"],
            "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "RLHF_WORKDIR": str(home), "GX_ANALYTICS_ENABLED": "False",
            "RLHF_SYSTEM_METRICS_SECONDS": "1"}


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow")
    proc = subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
                          env=airflow_env(home), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return home


def dags_test(home: Path, conf: dict, **env) -> subprocess.CompletedProcess:
    """``airflow dags test rlhf_tuning -c CONF``; the test plays the admin, whose base
    config ($RLHF_BASE_CONFIG: governance, storage, tracking) is the config file it names,
    in the admin's config folder ($RLHF_CONFIG_DIR)."""
    if conf.get("config_file") and "RLHF_CONFIG_DIR" not in env:
        env["RLHF_CONFIG_DIR"] = str(Path(conf["config_file"]).parent)
    if conf.get("config_file") and "RLHF_BASE_CONFIG" not in env:
        env["RLHF_BASE_CONFIG"] = conf["config_file"]
    return subprocess.run([str(Path(sys.executable).parent / "airflow"), "dags", "test",
                           "rlhf_tuning", "-c", json.dumps(conf)],
                          env={**airflow_env(home), **env}, capture_output=True, text=True,
                          timeout=900, cwd=home)


def task_states(home: Path, log: str, **env) -> dict[str, str]:
    """Task states of the run that ``airflow dags test`` logged, from Airflow's own DB."""
    import re

    run_id = re.search(r"DagRun Finished: .*?run_id=([^,\s]+)", log).group(1)
    proc = subprocess.run([str(Path(sys.executable).parent / "airflow"), "tasks",
                           "states-for-dag-run", "rlhf_tuning", run_id, "-o", "json"],
                          env={**airflow_env(home), **env}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout[proc.stdout.index("["):])
    # a mapped task's instances also as task_id[index]
    return {**{row["task_id"]: row["state"] for row in rows},
            **{f"{row['task_id']}[{row['map_index']}]": row["state"] for row in rows
               if str(row.get("map_index", "")).isdigit()}}


def task_links(home: Path, log: str, db_url: str | None = None) -> dict[str, str]:
    """The "MLflow run" extra link of each task of the run ``airflow dags test`` logged, as
    Airflow stored it (XCom, key ``_link_MlflowRunLink``)."""
    import re

    import sqlalchemy

    run_id = re.search(r"DagRun Finished: .*?run_id=([^,\s]+)", log).group(1)
    engine = sqlalchemy.create_engine(db_url or f"sqlite:///{home / 'airflow.db'}")
    with engine.connect() as conn:
        rows = conn.execute(sqlalchemy.text(
            "select task_id, map_index, value from xcom where key = '_link_MlflowRunLink' "
            "and run_id = :run"), {"run": run_id}).all()
    engine.dispose()
    # a mapped task's links by task_id[index]
    return {task if index < 0 else f"{task}[{index}]":
            json.loads(value) if isinstance(value, str) else value
            for task, index, value in rows}


@contextlib.contextmanager
def api_server(home: Path, tmp_path: Path, users: str, **env):
    """A real Airflow API server on ``home``'s metadata DB, simple auth manager users
    ``users`` ("name:role,..."); yields (base URL, {user: bearer headers})."""
    import httpx

    from conftest import free_port, wait_http

    port = free_port()
    passwords = tmp_path / "passwords.json"
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "airflow"), "api-server", "--port", str(port)],
        env={**airflow_env(home), "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": users,
             "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords), **env},
        cwd=home, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "api-server.log", "w"))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/api/v2/monitor/health", server)
        headers = {}
        for user, password in json.loads(passwords.read_text()).items():
            token = httpx.post(f"{base}/auth/token", json={"username": user,
                                                           "password": password}).json()
            headers[user] = {"Authorization": f"Bearer {token['access_token']}"}
        yield base, headers
    finally:
        server.terminate()
        server.wait(30)


def run_config(tmp_path: Path, demo_dir: Path, panel: dict | None = None, **data) -> Path:
    """The demo's config with small training sizes, the SFT baseline off, 40 eval prompts,
    and a policy no candidate this small can meet (pass rate 1.0: the gate rejects)."""
    import yaml

    cfg = yaml.safe_load((demo_dir / "demo.yaml").read_text())
    cfg["reward"].update(train_steps=20, norm_samples=32)
    cfg["sft"]["enabled"] = False
    cfg["ppo"].update(train_steps=2, batch_size=16, response_length=16)
    cfg["evaluation"].update(max_prompts=40, max_new_tokens=16)
    cfg["panel"].update({"store_url": f"sqlite:///{tmp_path / 'panel.db'}",
                         "pass_rate_threshold": 1.0, **(panel or {})})
    cfg["storage"]["artifact_root"] = str(tmp_path / "artifacts")
    cfg["storage"]["allowed_roots"].append(str(tmp_path))
    cfg["tracking"] = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                       "artifact_location": (tmp_path / "mlartifacts").as_uri()}
    cfg["data"].update(data)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# (before the main run: each run's base config names its own preference file, and Airflow
# marks an Asset whose name another file already holds inactive)
def test_new_preference_data_queues_a_retraining_run(airflow_home, demo_dir, tmp_path):
    """The ingest DAG emits the Asset event only when the data changed, and the event
    queues rlhf_tuning when the base config asks for retraining on new data."""
    import shutil

    import yaml

    prefs = tmp_path / "prefs.jsonl"
    shutil.copy(demo_dir / "preferences.jsonl", prefs)
    config = run_config(tmp_path, demo_dir, preference_uri=str(prefs))
    raw = yaml.safe_load(config.read_text())
    raw["schedule"] = {"cron": "0 3 * * 1", "on_new_preferences": True}
    config.write_text(yaml.safe_dump(raw))
    env = {"RLHF_BASE_CONFIG": str(config)}
    # the Airflow CLI's own commands, in one process (each start-up costs ~10 s): make
    # the DAGs known, unpause rlhf_tuning (a paused DAG is not queued by asset events),
    # then ingest three times (new file, same file, changed file), counting the Asset's
    # events and queued runs after each
    script = (
        "import json, sys\n"
        "from sqlalchemy import select, func\n"
        "from airflow.cli import cli_parser\n"
        "from airflow.models.asset import AssetEvent, AssetModel, AssetDagRunQueue\n"
        "from airflow.utils.session import create_session\n"
        "prefs = sys.argv[1]\n"
        "def cli(*argv):\n"
        "    args = cli_parser.get_parser().parse_args(list(argv))\n"
        "    args.func(args)\n"
        "def count():\n"
        "    with create_session() as s:\n"
        "        a = s.scalar(select(AssetModel).where(AssetModel.uri == prefs))\n"
        "        events = s.scalar(select(func.count()).select_from(AssetEvent)"
        ".where(AssetEvent.asset_id == a.id))\n"
        "        queued = s.scalars(select(AssetDagRunQueue.target_dag_id)"
        ".where(AssetDagRunQueue.asset_id == a.id)).all()\n"
        "    print('=== COUNT', json.dumps([events, sorted(queued)]), flush=True)\n"
        "cli('dags', 'reserialize')\n"
        "cli('dags', 'unpause', 'rlhf_tuning')\n"
        "for change in (None, None, sys.argv[2]):\n"
        "    if change:\n"
        "        open(sys.argv[3], 'a').write(change)\n"
        "    print('=== INGEST', flush=True)\n"
        "    cli('dags', 'test', 'rlhf_ingest_preferences')\n"
        "    count()\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"d = DagBag(dag_folder={str(ROOT / 'dags')!r}, bundle_path={str(ROOT / 'dags')!r})"
        ".dags['rlhf_tuning']\n"
        "print('=== SCHEDULE', type(d.timetable).__name__, flush=True)\n")
    change = ('{"prompt": "ran payroll", "chosen": "Cut payroll errors by 20%", '
              '"rejected": "Did payroll"}\n')
    proc = subprocess.run([sys.executable, "-c", script, prefs.as_uri(), change, str(prefs)],
                          env={**airflow_env(airflow_home), **env}, capture_output=True,
                          text=True, timeout=900, cwd=airflow_home)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    ingests = log.split("=== INGEST")[1:]
    counts = [json.loads(part.split("=== COUNT", 1)[1].splitlines()[0]) for part in ingests]
    assert counts[0] == [1, ["rlhf_tuning"]], counts
    assert "preference data unchanged" in ingests[1] and counts[1][0] == 1, counts
    assert counts[2][0] == 2, counts
    assert "=== SCHEDULE AssetOrTimeSchedule" in log


def test_dag_validates_trains_and_tracks(airflow_home, demo_model_dir, tmp_path):
    """The whole DAG, as a bake-off of two candidates (PPO and DPO: one mapped training
    task each), judged in one blinded batch; the gate registers both, tagged with their
    algorithm, and (the policy's bar is out of reach) rejects both."""
    import mlflow
    import yaml

    demo_dir = demo_model_dir
    config = run_config(tmp_path, demo_dir)
    raw = yaml.safe_load(config.read_text())
    raw["tuning"] = {"algorithms": ["ppo", "dpo"]}
    raw["dpo"] = {"train_steps": 4, "batch_size": 8}
    config.write_text(yaml.safe_dump(raw))
    proc = dags_test(airflow_home, {"config_file": str(config)},
                     RLHF_MLFLOW_UI_URL="http://mlflow.example:5000/")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    # the SFT baseline is off: its two tasks are skipped, and the run still finishes
    assert "rlhf_tasks.cli run sft" not in log and "rlhf_tasks.cli run validate_sft" not in log
    states = task_states(airflow_home, log)
    assert states["validate.sft"] == states["sft"] == "skipped", states
    assert states["reward"] == states["finish_tracking"] == "success", states
    assert states["tune[0]"] == states["tune[1]"] == "success", states
    assert "tune[2]" not in states, states
    for task in ("evaluate", "simulated_panel", "panel_simulate", "wait_for_panel", "gate"):
        assert states[task] == "success", (task, states)
    # the gate rejected (pass rate below 1.0): nothing promoted, no sign-off asked
    assert states["sign_off"] == states["promote"] == "skipped", states
    assert states["abort_tracking"] == "skipped", states
    runs = list((tmp_path / "artifacts" / "rlhf_tuning").iterdir())
    assert len(runs) == 1
    for kind, kept in (("preference", 4000), ("prompt", 1500), ("eval", 200)):
        step = runs[0] / f"validate_{kind}"
        manifest = json.loads((step / "MANIFEST.json").read_text())
        assert manifest["status"] == "ok", kind
        assert json.loads((step / "report.json").read_text())["rows_kept"] == kept
        assert (step / "data_docs" / "index.html").exists()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs_df = mlflow.search_runs(experiment_names=["rlhf-tuning"])
    parent = runs_df[runs_df["tags.mlflow.parentRunId"].isna()]
    children = runs_df[runs_df["tags.rlhf.step"].notna()]  # the steps' runs
    views = runs_df[runs_df["tags.rlhf.panel.model"].notna()]  # the panel's evaluation runs
    assert len(parent) + len(children) + len(views) == len(runs_df)
    assert len(parent) == 1 and parent.iloc[0]["status"] == "FINISHED"
    assert set(children["tags.rlhf.step"]) == {"validate_preference", "validate_prompt",
                                               "validate_eval", "reward", "ppo", "dpo",
                                               "evaluate", "gate"}
    assert set(children["tags.rlhf.candidate"].dropna()) == {"ppo", "dpo"}
    gate = children[children["tags.rlhf.step"] == "gate"].iloc[0]
    assert gate["tags.panel.simulated"] == "true" and gate["metrics.panel/promote"] == 0
    # one batch: 40 prompts x (foundation, ppo, dpo), 3 verdicts each
    assert gate["metrics.panel/verdicts"] == 120 * 3 and gate["metrics.panel/items"] == 120
    for label in ("ppo", "dpo"):
        assert 0 <= gate[f"metrics.panel/{label}/ci_low"] <= \
            gate[f"metrics.panel/{label}/pass_rate"] <= gate[f"metrics.panel/{label}/ci_high"] <= 1
        # each against the foundation model, its p Holm-adjusted for the two candidates
        assert gate[f"metrics.panel/bake_off/{label}/p_value"] <= \
            gate[f"metrics.panel/bake_off/{label}/p_holm"] <= 1
    assert gate["metrics.panel/bake_off/ppo/chosen"] + \
        gate["metrics.panel/bake_off/dpo/chosen"] == 1
    assert "p (Holm)" in log  # the gate's table, one row per algorithm
    # the benefit and cost (the demo's prices): measured compute priced; a simulated panel
    # has no expert time
    assert gate["metrics.cost/tuning_device_hours"] > 0 and gate["metrics.cost/tuning"] > 0
    assert gate["metrics.cost/panel_hours"] == 0
    assert gate["metrics.cost/ppo/seconds_per_answer"] > 0
    gate_json = json.loads((runs[0] / "gate" / "gate.json").read_text())
    assert {"reward", "ppo", "dpo", "evaluate"} <= set(gate_json["compute"])
    assert {label: c["algorithm"] for label, c in gate_json["candidates"].items()} == \
        {"ppo": "ppo", "dpo": "dpo"}
    assert gate_json["candidate"] in ("ppo", "dpo") and gate_json["decision"] == "reject"
    assert "no expert time" in gate_json["benefit_and_cost"]["evaluation"]["source"]
    # the closed panel in MLflow's evaluation views: a run per model under the gate's,
    # each with the gate's pass rate; simulated raters' feedback labelled CODE
    assert (views["tags.mlflow.parentRunId"] == gate["run_id"]).all()
    for model, rate in zip(views["tags.rlhf.panel.model"], views["metrics.panel_majority/mean"]):
        assert rate == pytest.approx(gate[f"metrics.panel/{model}/pass_rate"]), model
    traces = mlflow.search_traces(locations=[gate["experiment_id"]], return_type="list")
    assert len(traces) == 120
    sources = {(a.source.source_type, a.source.source_id.split(":")[0])
               for t in traces for a in t.info.assessments if a.name == "expert_pass"}
    assert sources == {("CODE", "simulated")}
    versions = {v.tags["algorithm"]: v for v in
                mlflow.MlflowClient().search_model_versions("name = 'resume-assistant'")}
    assert set(versions) == {"ppo", "dpo"}
    for algorithm, version in versions.items():
        assert version.tags["gate.decision"] == "reject", algorithm
        assert "below the minimum 1.000" in version.tags["gate.reason"]
        assert version.tags["panel.simulated"] == "true" and not version.aliases
        assert version.tags["bake_off"] == "ppo,dpo"
        # versions are MLflow models: the policy answers through pyfunc, the reward model
        # is linked to the run that trained it
        assert version.source == str(runs[0] / algorithm / "served")
        assert version.run_id == children[children["tags.rlhf.step"] == algorithm
                                          ].iloc[0]["run_id"]
    answers = mlflow.pyfunc.load_model("models:/resume-assistant/1").predict(
        ["Rewrite: helped with payroll for 40 staff"])
    assert len(answers) == 1 and isinstance(answers[0], str)
    reward_version = mlflow.MlflowClient().get_model_version("resume-assistant-reward", "1")
    reward_run = children[children["tags.rlhf.step"] == "reward"].iloc[0]["run_id"]
    assert reward_version.run_id == reward_run
    assert reward_version.source == str(runs[0] / "reward" / "served")
    for step in ("reward", "ppo", "dpo"):
        manifest = json.loads((runs[0] / step / "model" / "MANIFEST.json").read_text())
        assert manifest["step"] == step and "adapter_model.safetensors" in manifest["files"]
    ppo = children[children["tags.rlhf.step"] == "ppo"].iloc[0]
    assert ppo["metrics.ppo/kl"] == ppo["metrics.ppo/kl"]  # logged (not NaN)
    assert 0.0 <= children["metrics.reward/heldout/accuracy"].max() <= 1.0
    assert (children["tags.mlflow.parentRunId"] == parent.iloc[0]["run_id"]).all()
    assert children["metrics.data/preference/rows_quarantined"].max() == 10
    check_runs_compare(children, parent.iloc[0], runs[0])
    # every step task links to its own MLflow run (bookkeeping tasks to the parent run)
    links = task_links(airflow_home, log)
    run_of = dict(zip(children["tags.rlhf.step"], children["run_id"]))
    experiment = parent.iloc[0]["experiment_id"]
    for task, step in (("validate.preference", "validate_preference"), ("reward", "reward"),
                       ("tune[0]", "ppo"), ("tune[1]", "dpo"), ("evaluate", "evaluate"),
                       ("gate", "gate")):
        assert links[task] == (f"http://mlflow.example:5000/#/experiments/{experiment}"
                               f"/runs/{run_of[step]}"), task
    assert links["start_tracking"].endswith(f"/runs/{parent.iloc[0]['run_id']}")


def check_runs_compare(children, parent, run_dir: Path) -> None:
    """What a user comparing runs in MLflow relies on: settings as params, inputs,
    system metrics, phase timings, the answers as tables, score histograms."""
    import mlflow

    client = mlflow.MlflowClient()
    step = {s: children[children["tags.rlhf.step"] == s].iloc[0] for s in
            ("reward", "ppo", "evaluate", "gate", "validate_eval")}
    # each step's run: its own config sections as params; the parent: all of them
    assert step["ppo"]["params.ppo.kl_coef"] == "0.05"
    assert step["ppo"]["params.ppo.train_steps"] == "2"
    assert step["reward"]["params.reward.lora_rank"] == "8"
    assert step["reward"]["params.model.base_model"] == parent["params.model.base_model"]
    assert step["evaluate"]["params.evaluation.max_new_tokens"] == "16"
    assert step["gate"]["params.panel.pass_rate_threshold"] == "1.0"
    assert step["validate_eval"]["params.data.eval_uri"] == parent["params.data.eval_uri"]
    # a step's run holds its own sections only
    assert pd_isna(step["reward"].get("params.ppo.kl_coef"))
    for name in ("ppo.kl_coef", "reward.lora_rank", "panel.mode", "compute.dtype"):
        assert isinstance(parent[f"params.{name}"], str), name
    assert "params.tracking.parent_run_id" not in parent.index
    config = mlflow.artifacts.load_dict(f"runs:/{parent['run_id']}/config.json")
    assert config["ppo"]["kl_coef"] == 0.05 and "parent_run_id" not in config["tracking"]
    # training runs name their inputs: the validated data, digest and source
    inputs = client.get_run(step["reward"]["run_id"]).inputs.dataset_inputs
    by_name = {d.dataset.name: d for d in inputs}
    assert by_name["preference"].dataset.source and by_name["preference"].dataset.digest
    assert json.loads(by_name["preference"].dataset.profile)["num_rows"] == 4000
    assert {t.value for t in by_name["preference"].tags if t.key == "mlflow.data.context"} \
        == {"training"}
    assert "prompt" in {d.dataset.name for d in
                        client.get_run(step["ppo"]["run_id"]).inputs.dataset_inputs}
    # the precision each GPU step computed in: compute.dtype auto, resolved on this machine
    from rlhf_tasks.models import cpu_has_amx_bf16

    for name in ("reward", "ppo", "evaluate"):
        assert step[name]["tags.compute.dtype_used"] == (
            "bf16" if cpu_has_amx_bf16() else "fp32"), name
    assert step["ppo"]["tags.ppo.algorithm"] == "ppo"
    # system metrics on training steps; where PPO's time goes
    assert step["ppo"]["metrics.system/cpu_utilization_percentage"] >= 0
    assert step["reward"]["metrics.system/system_memory_usage_megabytes"] > 0
    for phase in ("rollout", "scoring", "advantages", "training"):
        assert step["ppo"][f"metrics.ppo/time/{phase}"] > 0, phase
    # the answers read back as tables: 40 prompts x (foundation, ppo, dpo); after the gate
    # with the panel's verdicts (k = 3 per item)
    mlflow.set_experiment("rlhf-tuning")
    # nothing in the evaluate run names an answer's model (the batch was open then)
    evaluated = {f.path for f in client.list_artifacts(step["evaluate"]["run_id"], "eval")}
    assert "eval/answers.json" not in evaluated
    judged = mlflow.load_table("panel/answers.json", run_ids=[step["gate"]["run_id"]])
    assert len(judged) == 120 and set(judged["model"]) == {"foundation", "ppo", "dpo"}
    assert {"prompt", "response", "reward"} <= set(judged.columns)
    assert (judged["passes"] + judged["fails"] == 3).all()
    for run, image in ((step["reward"], "reward/heldout_scores.png"),
                       (step["evaluate"], "eval/reward_scores.png")):
        assert image in {f.path for f in client.list_artifacts(run["run_id"], image.split("/")[0])}


def pd_isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


def test_review_page_in_airflow_uses_the_airflow_login(airflow_home, tmp_path):
    """The plugin mounted in a real Airflow API server: 401 without the Airflow login;
    403 for a logged-in user who is not on the panel (a Viewer, an Admin); members are the
    store's reviewer list (by user id) and the base config's reviewer roles."""
    import httpx

    from rlhf_tasks.panel.store import PanelStore

    store_url = f"sqlite:///{tmp_path / 'panel.db'}"
    store = PanelStore(store_url)
    store.add_reviewer("ann", with_token=False)
    store.add_reviewer("rex", with_token=False)
    store.revoke_reviewer("rex")
    batch = store.create_batch(pipeline="p", run_id="r", verdicts_per_item=1, quality_bar="b",
                               simulated=False, items=[{"prompt_index": 0, "prompt": "p",
                                                        "response": "a", "model": "m"}])
    item = store.items(batch)[0]["id"]
    base_config = tmp_path / "base.yaml"
    base_config.write_text("panel: {reviewer_roles: [op]}\n")
    with api_server(airflow_home, tmp_path, "ann:viewer,vic:viewer,boss:admin,olga:op,rex:user",
                    RLHF_PANEL_STORE_URL=store_url, RLHF_BASE_CONFIG=str(base_config)) \
            as (base, users):
        assert httpx.get(f"{base}/rlhf-review/api/me").status_code == 401
        assert httpx.get(f"{base}/rlhf-review/api/batches").status_code == 401
        assert httpx.post(f"{base}/rlhf-review/api/items/x/verdict",
                          json={"passed": True}).status_code == 401
        page = httpx.get(f"{base}/rlhf-review/")
        assert page.status_code == 200 and "Expert review" in page.text
        for outsider in ("vic", "boss", "rex"):  # not on the panel, an admin, revoked
            h = users[outsider]
            assert httpx.get(f"{base}/rlhf-review/api/batches", headers=h).status_code == 403
            assert httpx.get(f"{base}/rlhf-review/api/batches/{batch}/next",
                             headers=h).status_code == 403
            assert httpx.post(f"{base}/rlhf-review/api/items/{item}/verdict", headers=h,
                              json={"passed": True}).status_code == 403
        assert store.verdict_rows(batch) == []
        headers = users["ann"]
        assert httpx.get(f"{base}/rlhf-review/api/me", headers=headers).json() == \
            {"reviewer": "ann"}
        assert [b["id"] for b in httpx.get(f"{base}/rlhf-review/api/batches",
                                           headers=headers).json()] == [batch]
        # a member by role
        assert httpx.get(f"{base}/rlhf-review/api/me", headers=users["olga"]).json() == \
            {"reviewer": "olga"}
        # a verdict is taken on an item the store served to that reviewer
        served = httpx.get(f"{base}/rlhf-review/api/batches/{batch}/next",
                           headers=users["olga"]).json()
        assert served["id"] == item
        voted = httpx.post(f"{base}/rlhf-review/api/items/{item}/verdict",
                           headers=users["olga"], json={"passed": True})
        assert voted.status_code == 201 and voted.json()["reviewer"] == "olga"
        # the UI's own cookie works too (a reviewer logged in to Airflow just opens the page)
        cookie = httpx.get(f"{base}/rlhf-review/api/me",
                           cookies={"_token": headers["Authorization"][7:]})
        assert cookie.json() == {"reviewer": "ann"}
        plugins = httpx.get(f"{base}/api/v2/plugins", headers=headers).json()["plugins"]
        review = next(p for p in plugins if p["name"] == "rlhf_review")
        assert review["external_views"][0]["href"] == "/rlhf-review/"


def test_trigger_form_attacks_stop_at_prepare_run(airflow_home, demo_dir, tmp_path):
    """Through real `airflow dags test` runs: a config file the admin did not provide, a
    governed field in the conf, the triggering user as approver, an approver who is not an
    Airflow user.  Each stops prepare_run with one line naming the field, and nothing else
    runs.  And prepare_run's XCom changed mid-run (through Airflow's XCom model, right after
    prepare_run succeeded) to name a file that lets a simulated panel promote: the next
    task fails without running its step, and nothing reads that file."""
    import yaml

    admin = tmp_path / "admin"
    admin.mkdir()
    raw = yaml.safe_load(run_config(tmp_path, demo_dir).read_text())
    for name, approver in (("ok", None), ("self", "dag_test"), ("ghost", "mallory")):
        raw["panel"]["approver"] = approver
        (admin / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    evil = tmp_path / "evil.yaml"
    evil.write_text(yaml.safe_dump({**raw, "panel": {**raw["panel"], "pass_rate_threshold": 0,
                                                     "approver": None}}))
    env = {"RLHF_CONFIG_DIR": str(admin),
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "alice:user,dag_test:admin"}
    ok = str(admin / "ok.yaml")
    # (base config, form): the approver is the base config's, never a run's file's
    attacks = [
        ((ok, {"config_file": str(evil)}, ""), "trigger form field 'config_file'"),
        ((ok, {"config_file": ok, "panel_mode": "simulated", "approver": "dag_test"}, ""),
         "trigger form field 'approver' may not be set"),
        ((str(admin / "self.yaml"), {}, ""), "panel.approver 'dag_test' triggered this run"),
        ((str(admin / "ghost.yaml"), {}, ""), "panel.approver 'mallory' is not an Airflow user"),
        ((ok, {}, str(evil)), "XCom was changed after prepare_run wrote it"),
    ]
    # the `airflow dags test` command itself, once per attack, in one process (the CLI's
    # start-up would otherwise cost ~15 s per attack)
    script = (
        "import json, os, sys\n"
        "from airflow.cli import cli_parser\n"
        "from airflow.listeners import hookimpl\n"
        "from airflow.sdk.listener import get_listener_manager\n"
        "class PatchXCom:\n"
        "    @hookimpl\n"
        "    def on_task_instance_success(self, previous_state, task_instance):\n"
        "        if os.environ['PATCH'] and task_instance.task_id == 'prepare_run':\n"
        "            from airflow.models.xcom import XComModel\n"
        "            XComModel.set(key='return_value', value={'config_uri': os.environ['PATCH'],\n"
        "                          'config_sha256': '0' * 64}, dag_id=task_instance.dag_id,\n"
        "                          task_id='prepare_run', run_id=task_instance.run_id)\n"
        "            print('=== PATCHED', flush=True)\n"
        "get_listener_manager().add_listener(PatchXCom())\n"
        "for base, conf, patch in json.loads(sys.argv[1]):\n"
        "    print('=== ATTACK', flush=True)\n"
        "    os.environ['RLHF_BASE_CONFIG'], os.environ['PATCH'] = base, patch\n"
        "    args = cli_parser.get_parser().parse_args(\n"
        "        ['dags', 'test', 'rlhf_tuning', '-c', json.dumps(conf)])\n"
        "    try:\n"
        "        args.func(args)\n"
        "    except SystemExit as exc:\n"
        "        print('=== EXIT', exc, flush=True)\n"
        "    from airflow.models import DagRun\n"
        "    from airflow.utils.session import create_session\n"
        "    with create_session() as s:\n"
        "        run = max(DagRun.find(dag_id='rlhf_tuning', session=s),\n"
        "                  key=lambda r: r.start_date)\n"
        "        states = {ti.task_id: ti.state for ti in run.get_task_instances(session=s)}\n"
        "    print('=== STATES', json.dumps(states), flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps([c for c, _ in attacks])],
                          env={**airflow_env(airflow_home), **env}, capture_output=True,
                          text=True, timeout=900, cwd=airflow_home)
    logs = (proc.stdout + proc.stderr).split("=== ATTACK")[1:]
    assert proc.returncode == 0 and len(logs) == len(attacks), (proc.stdout + proc.stderr)[-4000:]
    for (conf, message), log in zip(attacks, logs):
        assert message in log, (conf, log[-4000:])
        assert "=== EXIT DagRun failed" in log, conf
        states = json.loads(log.split("=== STATES", 1)[1].splitlines()[0])
        refused = "start_tracking" if conf[2] else "prepare_run"
        assert states[refused] == "failed", (conf, states)
        assert states["reward"] == states["gate"] == "upstream_failed", (conf, states)
        assert "rlhf_tasks.cli run" not in log, conf  # no step ran, none read a config
    assert "=== PATCHED" in logs[-1]
    # only the patched run wrote anything: its config, nothing that followed
    written = sorted(p.name for p in (tmp_path / "artifacts").rglob("*") if p.is_file())
    assert written == ["config.json"], written
