"""DAG integrity: imports cleanly, the Params form, no heavy imports at parse time."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "trl", "peft", "great_expectations", "mlflow", "pandas")


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"), bundle_path=ROOT / "dags")


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert "rlhf_tuning" in dagbag.dags


def test_graph(dagbag):
    from rlhf_airflow.operators.step import RlhfStepOperator

    dag = dagbag.dags["rlhf_tuning"]
    ids = set(dag.task_ids)
    assert {"prepare_run", "start_tracking", "validate.preference", "validate.prompt",
            "validate.eval", "validate.sft", "finish_tracking", "abort_tracking"} <= ids
    # every step logs under the MLflow parent run start_tracking made: an XComArg, so an
    # edge from start_tracking; the other edges are the stages'
    for task in dag.tasks:
        if isinstance(task, RlhfStepOperator) and task.task_id != "start_tracking":
            assert "start_tracking" in task.upstream_task_ids, task.task_id

    def up(task_id):
        return dag.get_task(task_id).upstream_task_ids - {"start_tracking"}

    assert dag.get_task("start_tracking").upstream_task_ids == {"prepare_run"}
    assert up("validate.preference") == set()
    assert dag.get_task("validate.eval").step == "validate_eval"
    # task groups: validate (with the SFT data), training, panel, release
    groups = {t.task_id: t.task_group.group_id for t in dag.tasks}
    assert {groups[t] for t in ("validate.preference", "validate.sft",
                                "validate.sft_enabled")} == {"validate"}
    assert {groups[t] for t in ("reward", "sft", "candidates", "tune")} == {"training"}
    assert {groups[t] for t in ("evaluate", "panel_simulate", "wait_for_panel")} == {"panel"}
    assert {groups[t] for t in ("gate", "sign_off", "promote")} == {"release"}
    # training: reward after every validation, the candidates after the reward model; SFT
    # is gated
    assert up("reward") == {"validate.preference", "validate.prompt", "validate.eval"}
    # RL starts from the SFT policy when SFT runs: tune waits for it, not when it is
    # skipped; one mapped task per candidate, its step read off the run's config
    assert up("tune") == {"reward", "sft", "candidates"}
    assert up("candidates") == {"prepare_run"}
    tune = dag.get_task("tune")
    assert tune.trigger_rule == "none_failed_min_one_success"
    assert tune.partial_kwargs["step"] == "@candidate"
    assert (tune.queue, tune.pool) == ("gpu", "gpu")  # the scheduler sees them unmapped
    assert up("validate.sft") == {"validate.sft_enabled"}
    assert dag.get_task("validate.sft").step == "validate_sft"
    assert up("sft") == {"validate.sft"}
    assert dag.get_task("validate.sft_enabled").ignore_downstream_trigger_rules is False
    # evaluation after PPO and (when it runs) SFT; the panel; the gate; promotion
    assert up("evaluate") == {"tune", "sft"}
    assert dag.get_task("evaluate").trigger_rule == "none_failed_min_one_success"
    assert up("panel_simulate") == {"simulated_panel"}
    assert up("wait_for_panel") == {"evaluate", "panel_simulate"}
    assert dag.get_task("wait_for_panel").trigger_rule == "none_failed_min_one_success"
    assert up("gate") == {"wait_for_panel"}
    # the wait is a sensor: at the panel's deadline it is skipped (soft_fail), and the gate
    # still runs (none_failed) to close the batch and reject; its link opens the review page
    wait = dag.get_task("wait_for_panel")
    from airflow.sdk import BaseSensorOperator

    assert isinstance(wait, BaseSensorOperator)
    assert wait.soft_fail is True and wait.deferrable is True
    assert dag.get_task("gate").trigger_rule == "none_failed"
    assert "Review page" in {link.name for link in wait.operator_extra_links}
    assert dag.get_task("gate_decision").downstream_task_ids == {"sign_off", "promote"}
    # a run that needs a sign-off is promoted by sign_off itself (the approval never
    # leaves Airflow's record); promote serves the runs that need none
    assert up("promote") == {"gate_decision"}
    assert [a.name for a in dag.get_task("sign_off").outlets] == ["rlhf-champion"]
    assert dag.get_task("sign_off").ignore_downstream_trigger_rules is True
    assert up("finish_tracking") == {"gate", "sign_off", "promote"}
    assert dag.get_task("finish_tracking").trigger_rule == "none_failed_min_one_success"
    assert {"reward", "tune", "sft", "evaluate", "gate", "promote", "wait_for_panel"} <= \
        dag.get_task("abort_tracking").upstream_task_ids


def test_params_have_descriptions_and_bounds(dagbag):
    params = dagbag.dags["rlhf_tuning"].params
    for name in ("preference_dataset", "prompt_dataset", "base_model",
                 "prompt_sequence_length", "target_sequence_length", "reward_model_train_steps",
                 "reward_model_learning_rate_multiplier", "reinforcement_learning_train_steps",
                 "reinforcement_learning_rate_multiplier", "kl_coeff", "lora_rank", "instruction",
                 "dtype", "gradient_checkpointing", "run_sft_baseline"):
        schema = params.get_param(name).schema
        assert params.get_param(name).description, name
        if schema.get("type") in ("integer", "number"):
            assert "minimum" in schema or "exclusiveMinimum" in schema, name
            assert "maximum" in schema or "exclusiveMaximum" in schema, name
    assert params.get_param("kl_coeff").schema["minimum"] == 0.0
    params.validate()  # defaults are valid


def test_params_reject_out_of_bounds(dagbag):
    from airflow.sdk.exceptions import ParamValidationError

    import copy

    params = copy.deepcopy(dagbag.dags["rlhf_tuning"].params)
    with pytest.raises(ParamValidationError, match="kl_coeff: -1 is less than the minimum"):
        params["kl_coeff"] = -1
    with pytest.raises(ParamValidationError, match="dtype"):
        params["dtype"] = "int4"


def test_governed_fields_are_not_on_the_form(dagbag):
    """Infrastructure and governance never appear in the trigger form."""
    params = dagbag.dags["rlhf_tuning"].params
    for name in ("backend", "panel_mode", "verdicts_per_item", "pass_rate_threshold",
                 "approver", "max_bad_fraction", "image", "trust_remote_code"):
        assert name not in params, name


def test_param_bounds_match_config_bounds():
    """Every form value within its schema bounds is a valid config value, and the ends too."""
    from rlhf_airflow.params import PARAM_TO_CONFIG, build_config, trigger_params

    params = trigger_params()
    for name, paths in PARAM_TO_CONFIG.items():
        schema = params[name].schema
        for key in ("minimum", "maximum"):
            if key in schema:
                build_config({name: schema[key]}, "d", "r")


def test_build_config_layers_form_over_file(tmp_path, monkeypatch):
    from rlhf_airflow.params import build_config, trigger_params

    base = tmp_path / "base.yaml"
    base.write_text("ppo: {kl_coef: 0.2}\ndata: {eval_uri: /data/eval.jsonl}\n")
    monkeypatch.setenv("RLHF_BASE_CONFIG", str(base))
    form = trigger_params()
    assert form["kl_coeff"].value == 0.2, "the form shows the base config's values"
    assert "eval_dataset" not in form, "the gating eval set is the admin's"
    assert form["kl_coeff"].schema["section"] == "Tuning (RL or DPO; a bake-off of several)"
    assert form["kl_coeff"].schema["title"] == "KL coefficient"
    params = {"config_file": str(base), "kl_coeff": 0.05, "lora_rank": 4,
              "instruction": None}
    cfg = build_config(params, "rlhf_tuning", "manual__2026-01-01T00:00:00+00:00",
                       conf=params, triggered_by="ann")
    assert cfg.ppo.kl_coef == 0.05, "a value set for the run wins, even the default's value"
    assert cfg.reward.lora_rank == cfg.ppo.lora_rank == cfg.sft.lora_rank == 4
    assert cfg.data.eval_uri == "/data/eval.jsonl"
    assert cfg.model.instruction == "", "an emptied field keeps the file's value"
    assert cfg.run.run_id == "manual____2026-01-01T00_3a00_3a00_2b00_3a00"
    assert cfg.run.triggered_by == "ann"
    assert cfg.storage.artifact_root.startswith("/")
    # a key absent from the run's conf is not set for the run (REST API, schedules)
    assert build_config({**params, "kl_coeff": 0.9}, "d", "r", conf={}).ppo.kl_coef == 0.2


def test_another_admin_file_decides_the_fields_nobody_edited(tmp_path, monkeypatch):
    """The UI sends every field; on a run of another admin file, the fields still showing
    the base config's values are that file's to decide, the edited ones win."""
    from rlhf_airflow.params import build_config, trigger_params

    base, folder = _admin(tmp_path, monkeypatch)
    (folder / "team.yaml").write_text("ppo: {kl_coef: 0.3, train_steps: 7}\n")
    sent = {name: p.value for name, p in trigger_params().items()}
    sent.update(config_file="team.yaml", reinforcement_learning_train_steps=12)
    cfg = build_config(sent, "d", "r", conf=sent)
    assert cfg.ppo.kl_coef == 0.3, "unedited: the chosen file's value"
    assert cfg.ppo.train_steps == 12, "edited: the form's value"


def _admin(tmp_path, monkeypatch):
    """An admin's base config and config folder; returns (base, folder)."""
    folder = tmp_path / "admin"
    folder.mkdir()
    base = folder / "base.yaml"
    base.write_text(f"storage: {{allowed_roots: [{tmp_path / 'data'}]}}\n"
                    "panel: {approver: alice, pass_rate_threshold: 0.8}\n")
    (folder / "team.yaml").write_text("ppo: {kl_coef: 0.3}\n")
    monkeypatch.setenv("RLHF_BASE_CONFIG", str(base))
    monkeypatch.setenv("RLHF_CONFIG_DIR", str(folder))
    return base, folder


def test_config_file_must_be_an_admin_file(tmp_path, monkeypatch):
    from rlhf_airflow.params import build_config
    from rlhf_tasks.errors import BadInput

    base, folder = _admin(tmp_path, monkeypatch)
    assert build_config({}, "d", "r").panel.approver == "alice"  # empty: the base config
    assert build_config({"config_file": "team.yaml"}, "d", "r").ppo.kl_coef == 0.3
    assert build_config({"config_file": str(folder / "team.yaml")}, "d", "r").ppo.kl_coef == 0.3
    evil = tmp_path / "evil.yaml"
    evil.write_text("panel: {pass_rate_threshold: 0}\n")
    (folder / "link.yaml").symlink_to(evil)
    for attempt in (str(evil), "../evil.yaml", "link.yaml", "s3://bucket/evil.yaml",
                    str(folder) + "/../evil.yaml"):
        with pytest.raises(BadInput, match="^field 'config_file': trigger form field "
                                           "'config_file'") as err:
            build_config({"config_file": attempt}, "d", "r")
        assert "\n" not in str(err.value)
    monkeypatch.delenv("RLHF_CONFIG_DIR")
    with pytest.raises(BadInput, match="config_file"):
        build_config({"config_file": str(folder / "team.yaml")}, "d", "r")


def test_the_form_lists_the_admins_config_files(tmp_path, monkeypatch):
    """config_file offers the base config and the admin folder's files by name (not a
    link out of the folder, not other files); each one offered is one prepare_run takes."""
    from rlhf_airflow.params import build_config, trigger_params

    base, folder = _admin(tmp_path, monkeypatch)
    (folder / "notes.txt").write_text("not a config")
    evil = tmp_path / "evil.yaml"
    evil.write_text("panel: {pass_rate_threshold: 0}\n")
    (folder / "link.yaml").symlink_to(evil)
    schema = trigger_params()["config_file"].schema
    assert schema["examples"][0] == str(base)
    assert "link.yaml" not in schema["examples"] and "notes.txt" not in schema["examples"]
    assert "team.yaml" in schema["examples"]
    assert schema["values_display"][str(base)].endswith("(base config)")
    for choice in schema["examples"]:
        build_config({"config_file": choice}, "d", "r")


@pytest.mark.parametrize("key", ["panel_mode", "approver", "verdicts_per_item",
                                 "pass_rate_threshold", "backend", "image", "max_bad_fraction",
                                 "tracking_uri", "trust_remote_code"])
def test_form_cannot_set_governed_fields(tmp_path, monkeypatch, key):
    from rlhf_airflow.params import build_config
    from rlhf_tasks.errors import BadInput

    _admin(tmp_path, monkeypatch)
    with pytest.raises(BadInput, match=f"trigger form field '{key}' may not be set"):
        build_config({key: 1}, "d", "r", conf={"kl_coeff": 0.1, key: 1})


def test_form_locations_stay_inside_the_allowed_roots(tmp_path, monkeypatch):
    from rlhf_airflow.params import build_config
    from rlhf_tasks.errors import BadInput

    _admin(tmp_path, monkeypatch)
    inside = tmp_path / "data" / "prefs.jsonl"
    cfg = build_config({"preference_dataset": str(inside)}, "d", "r")
    assert cfg.data.preference_uri == str(inside)
    # a hub model: on the admin's list, at a commit
    (tmp_path / "admin" / "base.yaml").write_text(
        (tmp_path / "admin" / "base.yaml").read_text() + "model: {hub_repos: [org/model]}\n")
    pinned = {"base_model": "org/model", "model_revision": "a" * 40}
    assert build_config(pinned, "d", "r").model.base_model == "org/model"
    for form, field in (({**pinned, "base_model": "org/other"}, "base_model"),
                        ({"base_model": "org/model"}, "model_revision"),
                        ({**pinned, "model_revision": "refs/pr/42"}, "model_revision"),
                        ({**pinned, "model_revision": "main"}, "model_revision")):
        with pytest.raises(BadInput, match=f"trigger form field '{field}'"):
            build_config(form, "d", "r")
    # a path that climbs back in is stored as the steps will read it
    climbing = tmp_path / "data" / "sub" / ".." / "prefs.jsonl"
    assert build_config({"preference_dataset": str(climbing)}, "d", "r"
                        ).data.preference_uri == str(inside)
    for name, value in (("preference_dataset", "/etc/passwd"),
                        ("sft_dataset", str(tmp_path / "data" / ".." / "x.jsonl")),
                        ("base_model", "s3://someone-else/model"),
                        ("prompt_dataset", str(tmp_path / "elsewhere.jsonl"))):
        with pytest.raises(BadInput, match=f"trigger form field '{name}'.*outside"):
            build_config({name: value}, "d", "r")


def test_approver_is_an_airflow_user_who_did_not_trigger(tmp_path, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    from rlhf_airflow.run_setup import prepare_run

    _admin(tmp_path, monkeypatch)
    monkeypatch.setenv("AIRFLOW__CORE__AUTH_MANAGER", "airflow.api_fastapi.auth.managers."
                       "simple.simple_auth_manager.SimpleAuthManager")
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "False")
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "bob:user,carol:admin")
    with pytest.raises(AirflowFailException, match="'alice' is not an Airflow user"):
        prepare_run({}, "d", "r1", conf={}, triggered_by="bob")
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "alice:user,bob:user")
    with pytest.raises(AirflowFailException, match="'alice' triggered this run"):
        prepare_run({}, "d", "r2", conf={}, triggered_by="alice")
    out = prepare_run({}, "d", "r3", conf={}, triggered_by="bob")
    assert out["approver"] == "alice"


def test_bad_form_value_fails_prepare_without_retry(tmp_path):
    from airflow.sdk.exceptions import AirflowFailException

    from rlhf_airflow.run_setup import prepare_run

    with pytest.raises(AirflowFailException, match="does-not-exist"):
        prepare_run({"config_file": str(tmp_path / "does-not-exist.yaml")}, "d", "r")


def test_dag_file_imports_nothing_heavy():
    code = (
        "import sys, time; sys.path.insert(0, 'plugins'); t = time.perf_counter();\n"
        "import importlib.util as u; s = u.spec_from_file_location('d', 'dags/rlhf_tuning.py');\n"
        "m = u.module_from_spec(s); s.loader.exec_module(m);\n"
        "import json; print(json.dumps({'seconds': time.perf_counter() - t, 'heavy': sorted(\n"
        f"  n for n in {HEAVY!r} if n in sys.modules)}}))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [], f"heavy modules imported at parse time: {report['heavy']}"


def test_step_argv_is_backend_neutral():
    from rlhf_airflow.backends import step_argv

    assert step_argv("validate_eval", "s3://b/c.json", ["a.b=1"], "/airflow/xcom/return.json") == [
        "rlhf", "run", "validate_eval", "--config", "s3://b/c.json", "--set", "a.b=1",
        "--result", "/airflow/xcom/return.json"]


def test_step_processes_get_a_minimal_environment(tmp_path, monkeypatch):
    """The local backend's step process sees what steps need (S3, MLflow, Hugging Face,
    this project's settings) and none of Airflow's secrets or the worker's other values."""
    import stat

    from rlhf_airflow.backends import LocalProcessBackend

    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\n"
                           f"env > {tmp_path / 'env.txt'}\n"
                           'for last; do :; done; echo "{}" > "$last"\n')
    fake_python.chmod(fake_python.stat().st_mode | stat.S_IEXEC)
    for name, value in {"AIRFLOW__CORE__FERNET_KEY": "fernet-secret",
                        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql://u:pw@db/airflow",
                        "AIRFLOW_CONN_WAREHOUSE": "postgres://u:pw@wh", "DB_PASSWORD": "hunter2",
                        "AWS_SECRET_ACCESS_KEY": "s3-key", "MLFLOW_TRACKING_TOKEN": "t",
                        "HF_HOME": "/cache/hf", "RLHF_PANEL_STORE_URL": "postgresql://p"}.items():
        monkeypatch.setenv(name, value)
    result = LocalProcessBackend(python=str(fake_python), cwd=str(tmp_path)).run(
        "start", ["rlhf", "run", "start", "--result", "@RESULT@"], lambda line: None)
    assert result == {}
    env = dict(line.split("=", 1) for line in (tmp_path / "env.txt").read_text().splitlines()
               if "=" in line)
    for secret in ("AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
                   "AIRFLOW_CONN_WAREHOUSE", "DB_PASSWORD"):
        assert secret not in env, secret
    for needed in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_TOKEN", "HF_HOME",
                   "RLHF_PANEL_STORE_URL", "PATH"):
        assert needed in env, needed
    assert env["PYTHONUNBUFFERED"] == "1"


def test_retraining_schedule_follows_the_base_config(tmp_path):
    from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable

    from rlhf_airflow.scheduling import base_config, retraining_schedule

    def schedule(**section):
        path = tmp_path / "base.yaml"
        path.write_text(json.dumps({"data": {"preference_uri": str(tmp_path / "p.jsonl")},
                                    "schedule": section}))
        return retraining_schedule(base_config(str(path)))

    assert schedule() is None
    assert retraining_schedule(base_config("")) is None
    assert isinstance(schedule(cron="0 3 * * 1"), CronTriggerTimetable)
    on_data = schedule(on_new_preferences=True)
    assert on_data == [Asset(name="rlhf-preferences", uri=(tmp_path / "p.jsonl").as_uri(),
                             group="rlhf")]
    both = schedule(cron="0 3 * * 1", on_new_preferences=True)
    assert isinstance(both, AssetOrTimeSchedule)
    # a broken base config must not break DAG parsing: it is logged and ignored
    (tmp_path / "bad.yaml").write_text("schedule: {cron: 'every monday'}\n")
    assert base_config(str(tmp_path / "bad.yaml")) is None


def test_run_folders_are_one_to_one_with_run_ids():
    """Two Airflow runs never share an artifact folder (``x:1`` and ``x+1`` used to)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from rlhf_airflow.params import safe_run_id

    assert safe_run_id("x:1") != safe_run_id("x+1") != safe_run_id("x_1")
    assert safe_run_id("manual__2026-11-29T21:09:44.8+00:00") == \
        "manual____2026-11-29T21_3a09_3a44.8_2b00_3a00"

    def unescape(name: str) -> str:
        out, i, raw = [], 0, b""
        while i < len(name):
            if name[i] == "_" and name[i + 1] == "_":
                out.append("_")
                i += 2
            elif name[i] == "_":
                raw = b""
                while i < len(name) and name[i] == "_" and name[i + 1] != "_":
                    raw += bytes.fromhex(name[i + 1:i + 3])
                    i += 3
                out.append(raw.decode("utf-8"))
            else:
                out.append(name[i])
                i += 1
        return "".join(out)

    @settings(max_examples=300, deadline=None)
    @given(st.text(min_size=1, max_size=40))
    def round_trip(run_id):
        name = safe_run_id(run_id)
        assert re.fullmatch(r"[A-Za-z0-9_.-]+", name)
        assert unescape(name) == run_id

    round_trip()


def test_limits_come_from_the_base_config(tmp_path, monkeypatch):
    """Step timeouts, GPU pool slots and the run's deadline alert: the admin's base config,
    read when the DAG is parsed."""
    from datetime import timedelta

    from airflow.dag_processing.dagbag import DagBag

    base = tmp_path / "base.yaml"
    base.write_text("compute: {num_gpus: 4, num_nodes: 2, backend: kubernetes, "
                    "step_timeout_hours: 2, step_timeouts_hours: {ppo: 30}}\n"
                    "schedule: {run_deadline_hours: 96}\n")
    monkeypatch.setenv("RLHF_BASE_CONFIG", str(base))
    dag = DagBag(dag_folder=str(ROOT / "dags"), bundle_path=ROOT / "dags").dags["rlhf_tuning"]
    tasks = dag.task_dict
    assert tasks["tune"].partial_kwargs["execution_timeout"] == timedelta(hours=30)
    assert tasks["reward"].execution_timeout == timedelta(hours=2)
    assert tasks["gate"].execution_timeout == timedelta(hours=2)
    for training_step in ("reward", "tune", "sft"):  # 2 nodes x 4 GPUs
        assert tasks[training_step].pool_slots == 8, training_step
    assert tasks["evaluate"].pool_slots == 4  # one pod
    assert tasks["gate"].pool_slots == 1 and tasks["validate.eval"].pool_slots == 1
    alert = dag.deadline[0] if isinstance(dag.deadline, list) else dag.deadline
    assert alert.interval == timedelta(hours=96)
    assert alert.callback.path == "rlhf_airflow.notifications.rlhf.run_overdue"
    # the champion Asset: promote announces it, the deployment template follows it
    assert [a.name for a in tasks["promote"].outlets] == ["rlhf-champion"]


def test_every_form_field_has_a_section_title_and_description():
    from rlhf_airflow.params import FORM, PARAM_TO_CONFIG, SECTIONS, trigger_params

    assert set(FORM) == set(PARAM_TO_CONFIG)
    for name, param in trigger_params().items():
        schema = param.schema
        assert schema["section"] in SECTIONS.values(), name
        assert schema["title"] and param.description, name
    assert "Panel" not in " ".join(SECTIONS.values()), "the panel's settings are governance"


def test_the_parent_run_is_start_trackings_run_id_and_nothing_else():
    """Steps get the MLflow parent run from start_tracking's result (an XComArg); a value
    that is not a run id (a changed XCom) fails the task before any step runs, and the
    setting is added once however often the task re-enters."""
    from airflow.sdk.exceptions import AirflowFailException

    from rlhf_airflow.operators.step import RlhfStepOperator

    run_id = "0123456789abcdef0123456789abcdef"
    op = RlhfStepOperator(task_id="reward", step="reward", config_uri="/cfg.json",
                          parent_run={"parent_run_id": run_id, "step": "start"})
    op._pin_config({})
    op._pin_config({})  # a deferred task resuming
    assert op.overrides == [f"tracking.parent_run_id={run_id}"]
    for bad in ({"parent_run_id": f"{run_id} --set panel.mode=simulated"},
                {"parent_run_id": "../x"}, {}, "not-a-run"):
        op = RlhfStepOperator(task_id="reward", step="reward", config_uri="/cfg.json",
                              parent_run=bad)
        with pytest.raises(AirflowFailException, match="is not an MLflow run id"):
            op._pin_config({})
