"""The trust boundary, tried by breaking it: each test is an attack that must fail.

A run's tasks derive their config from the run (an XCom changed mid-run is refused before
anything reads the file it names); users are compared by id (a FAB-style auth manager,
ids unlike names); governance comes from the base config only; hub models are listed and
pinned; what a step trusts in a model folder is hashed; the review app's edges.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlhf_tasks import config
from rlhf_tasks.errors import BadInput

FAB = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
SIMPLE = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"


def _admin(tmp_path, monkeypatch, extra: str = "") -> None:
    folder = tmp_path / "admin"
    folder.mkdir()
    base = folder / "base.yaml"
    base.write_text(f"storage: {{artifact_root: {tmp_path / 'artifacts'}, "
                    f"allowed_roots: [{tmp_path / 'data'}]}}\n"
                    f"data: {{eval_uri: {tmp_path / 'data' / 'eval.jsonl'}}}\n" + extra)
    monkeypatch.setenv("RLHF_BASE_CONFIG", str(base))
    monkeypatch.setenv("RLHF_CONFIG_DIR", str(folder))


class _TaskInstance:
    """What a task reads of its run: the XComs of earlier tasks (as the Task SDK serves)."""

    def __init__(self, xcoms: dict):
        self.xcoms = xcoms

    def xcom_pull(self, task_ids: str):
        return self.xcoms.get(task_ids)


def _context(prepared: dict, dag_id: str = "rlhf_tuning", run_id: str = "manual__1"):
    return {"dag": SimpleNamespace(dag_id=dag_id), "run_id": run_id,
            "ti": _TaskInstance({"prepare_run": prepared})}


def test_a_task_reads_only_its_runs_own_config(tmp_path, monkeypatch):
    """prepare_run writes the run's config and its digest; an XCom changed afterwards to
    name another file (one that lets a simulated panel promote) stops the next task
    before that file is read, and a changed config file stops the step (exit 2)."""
    from airflow.sdk.exceptions import AirflowFailException

    from rlhf_airflow.operators.step import RlhfStepOperator
    from rlhf_airflow.run_config import resolve
    from rlhf_airflow.run_setup import prepare_run
    from rlhf_tasks import cli

    _admin(tmp_path, monkeypatch)
    prepared = prepare_run({}, "rlhf_tuning", "manual__1", conf={})
    uri, digest = resolve(_context(prepared))
    assert uri == prepared["config_uri"] and uri.startswith(str(tmp_path / "artifacts"))
    assert config.load(uri, sha256=digest).run.run_id == "manual____1"

    evil = tmp_path / "evil.json"
    evil.write_text(json.dumps({"panel": {"mode": "simulated",
                                          "simulated_may_promote": True}}))
    read = []
    real_read = config.read_source
    monkeypatch.setattr(config, "read_source", lambda s: read.append(s) or real_read(s))
    patched = {**prepared, "config_uri": str(evil)}
    op = RlhfStepOperator(task_id="gate", step="gate")
    with pytest.raises(AirflowFailException, match="XCom was changed"):
        op.execute(_context(patched))
    assert str(evil) not in read  # (the base config was read: that is how it derives)
    # no digest, or another run's XCom: refused as well
    with pytest.raises(AirflowFailException, match="config_sha256"):
        resolve(_context({**prepared, "config_sha256": None}))
    with pytest.raises(AirflowFailException, match="XCom was changed"):
        resolve(_context(prepared, run_id="manual__2"))

    # the file itself rewritten in the store after prepare_run: the step stops, exit 2
    text = Path(uri)
    text.write_text(text.read_text().replace('"simulated_may_promote": false',
                                             '"simulated_may_promote": true'))
    with pytest.raises(BadInput, match="not the file this run was prepared with"):
        config.load(uri, sha256=digest)
    assert cli.main(["run", "start", "--config", uri, "--config-sha256", digest]) == 2


def test_user_ids_not_names_with_a_fab_style_auth_manager(tmp_path, monkeypatch):
    """FAB's ids are numbers: alice is user 7.  With approver "7", alice triggering the
    run is caught (by id); a triggering user whose id is unknown fails closed."""
    from airflow.sdk.exceptions import AirflowFailException

    from rlhf_airflow.run_setup import check_approver, prepare_run, user_id

    monkeypatch.setenv("AIRFLOW__CORE__AUTH_MANAGER", FAB)
    _admin(tmp_path, monkeypatch, "panel: {approver: '7', user_ids: {alice: '7', bob: '8'}}\n")
    assert user_id("alice", {"alice": "7"}) == "7" and user_id("carol", {}) is None
    with pytest.raises(AirflowFailException, match="'7' triggered this run"):
        prepare_run({}, "rlhf_tuning", "r1", conf={}, triggered_by="alice")
    with pytest.raises(AirflowFailException, match="id of 'carol'.*unknown"):
        prepare_run({}, "rlhf_tuning", "r2", conf={}, triggered_by="carol")
    out = prepare_run({}, "rlhf_tuning", "r3", conf={}, triggered_by="bob")
    cfg = config.load(out["config_uri"], sha256=out["config_sha256"])
    assert (cfg.run.triggered_by, cfg.run.triggered_by_id) == ("bob", "8")
    # a scheduled run has no triggering user: nothing to compare
    check_approver("7", None, None)
    # the simple auth manager: ids are the names
    monkeypatch.setenv("AIRFLOW__CORE__AUTH_MANAGER", SIMPLE)
    assert user_id("alice", {}) == "alice"


def test_the_sign_off_refuses_an_approver_who_triggered_by_id(tmp_path, monkeypatch):
    """The sign-off compares ids, and fails closed on a run whose triggering id is
    unknown (a config written before ids were recorded, or by hand)."""
    from airflow.sdk.exceptions import AirflowFailException

    from rlhf_airflow.operators.sign_off import SignOffOperator

    op = SignOffOperator(task_id="sign_off", subject="s")
    for run, error in (({"triggered_by": "alice", "triggered_by_id": "7"}, "triggered this run"),
                       ({"triggered_by": "alice"}, "unknown")):
        cfg = config.validate({"panel": {"approver": "7"}, "run": run})
        op._config = lambda context, cfg=cfg: cfg
        with pytest.raises(AirflowFailException, match=error):
            op.execute({})


def test_governance_comes_only_from_the_base_config(tmp_path, monkeypatch):
    """A file in the admin's folder brings run defaults; what it says about the panel, the
    registry, storage, tracking, compute's images and the gating eval set is replaced by
    the base config's.  The run's people are never read from a file."""
    from rlhf_airflow.params import build_config

    _admin(tmp_path, monkeypatch, "panel: {approver: alice, pass_rate_threshold: 0.8}\n")
    (tmp_path / "admin" / "loose.yaml").write_text(
        "ppo: {kl_coef: 0.3}\n"
        "panel: {mode: simulated, simulated_may_promote: true, pass_rate_threshold: 0.0}\n"
        "registry: {model_name: other}\n"
        f"storage: {{artifact_root: {tmp_path / 'elsewhere'}, allowed_roots: [/]}}\n"
        "compute: {backend: kubernetes, kubernetes: {image: evil/image:1}, dtype: fp32}\n"
        "data: {eval_uri: /easy/eval.jsonl, max_bad_fraction: 1.0}\n"
        "model: {trust_remote_code: true, hub_downloads: true}\n"
        "evaluation: {max_prompts: 1}\n"
        "run: {triggered_by_id: alice, approved_by: alice}\n")
    cfg = build_config({"config_file": "loose.yaml"}, "d", "r", triggered_by="tom")
    assert cfg.ppo.kl_coef == 0.3 and cfg.compute.dtype == "fp32"  # run defaults: kept
    assert cfg.panel.approver == "alice" and cfg.panel.pass_rate_threshold == 0.8
    assert not cfg.panel.simulated_may_promote and cfg.registry.model_name == "rlhf-policy"
    assert cfg.storage.artifact_root == str(tmp_path / "artifacts")
    assert cfg.storage.allowed_roots == [str(tmp_path / "data")]
    assert cfg.compute.backend == "local" and cfg.compute.kubernetes.image != "evil/image:1"
    assert cfg.data.eval_uri == str(tmp_path / "data" / "eval.jsonl")
    assert cfg.data.max_bad_fraction == 0.0 and cfg.evaluation.max_prompts is None
    assert not cfg.model.trust_remote_code and not cfg.model.hub_downloads
    assert cfg.run.triggered_by_id is None and cfg.run.approved_by is None


def test_hub_models_are_not_downloaded_unless_the_base_config_allows(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from rlhf_tasks import models

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cfg = config.validate({"model": {"base_model": "acme/not-cached", "revision": "a" * 40}})
    with pytest.raises(BadInput, match="allows no downloads"):
        models.base_model_dir(cfg)


def test_the_weights_digest_is_hashed_not_read_off_a_manifest_or_a_link(tmp_path):
    """A MANIFEST.json in the folder, or a link whose target is named like a sha256 but
    lies outside the hub cache, could say anything: the files are hashed."""
    import hashlib
    import os

    from rlhf_tasks import models
    from rlhf_tasks.storage import sha256_file

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "a.safetensors").write_bytes(b"real weights")
    (folder / "MANIFEST.json").write_text(json.dumps(
        {"files": {"a.safetensors": {"sha256": "0" * 64}}}))
    fake = tmp_path / "blobs" / ("1" * 64)
    fake.parent.mkdir()
    fake.write_bytes(b"other weights")
    os.symlink(fake, folder / "b.safetensors")
    models._weights_digest.cache_clear()
    expected = (f"a.safetensors:{sha256_file(folder / 'a.safetensors')}\n"
                f"b.safetensors:{sha256_file(fake)}")
    assert models._weights_digest(str(folder)) == hashlib.sha256(expected.encode()).hexdigest()


def test_the_runs_model_is_rechecked_against_the_roots(tmp_path):
    """A config that names a model outside the roots (written by hand, or through a path
    that climbs out) is refused by the step, not only by the form."""
    from rlhf_tasks import models
    from rlhf_tasks.storage import Storage

    (tmp_path / "inside").mkdir()
    (tmp_path / "outside").mkdir()
    cfg = config.validate({"model": {"base_model": str(tmp_path / "inside" / ".." / "outside")},
                           "storage": {"artifact_root": str(tmp_path / "a"),
                                       "allowed_roots": [str(tmp_path / "inside")]}})
    with pytest.raises(BadInput, match="outside the configured storage roots"):
        models.base_model_dir(cfg, Storage.from_config(cfg))


@pytest.mark.parametrize("run_id", [".", "..", ".hidden"])
def test_no_run_folder_is_dot_dot_or_hidden(run_id):
    from rlhf_airflow.params import safe_run_id

    folder = safe_run_id(run_id)
    assert not folder.startswith(".") and folder.startswith("_2e")
    assert safe_run_id("_" + run_id[1:]) != folder  # still one-to-one
    with pytest.raises(BadInput, match="run.run_id"):
        config.validate({"run": {"run_id": run_id}})


def test_exported_csv_cells_cannot_run_as_formulas(tmp_path):
    import csv

    from rlhf_tasks.panel.offline import csv_cell, export_batch
    from rlhf_tasks.panel.store import PanelStore

    assert csv_cell("=HYPERLINK(\"http://x\")") == "'=HYPERLINK(\"http://x\")"
    assert [csv_cell(v) for v in ("+1", "-1", "@SUM(A1)", "\tx", "ok = fine")] == [
        "'+1", "'-1", "'@SUM(A1)", "'\tx", "ok = fine"]
    store = PanelStore(f"sqlite:///{tmp_path}/p.db")
    batch = store.create_batch(pipeline="p", run_id="r", items=[
        {"prompt_index": 0, "prompt": "=1+1", "response": "@cmd", "model": "m"}],
        verdicts_per_item=1, quality_bar="bar", simulated=False)
    export_batch(store, batch, tmp_path / "out.csv")
    store.dispose()
    row = next(csv.DictReader(open(tmp_path / "out.csv", encoding="utf-8")))
    assert (row["prompt"], row["response"]) == ("'=1+1", "'@cmd")


def _app(tmp_path, excluded=()):
    from fastapi.testclient import TestClient

    from rlhf_tasks.panel.app import SignInLimiter, create_app, token_identity
    from rlhf_tasks.panel.store import PanelStore

    store = PanelStore(f"sqlite:///{tmp_path}/panel.db")
    store.batch_id = store.create_batch(pipeline="p", run_id="r", items=[
        {"prompt_index": i, "prompt": f"q{i}", "response": f"a{i}", "model": "m"}
        for i in range(2)], verdicts_per_item=1, quality_bar="bar", simulated=False,
        excluded=excluded)
    identity = token_identity(store, SignInLimiter(failures=3, window_s=60))
    return store, TestClient(create_app(store, identity, login_form=True))


def test_the_runs_triggering_user_gets_403_on_its_batch(tmp_path):
    store, client = _app(tmp_path, excluded=["tom", "7"])
    auth = {n: {"Authorization": f"Bearer {store.add_reviewer(n)}"} for n in ("tom", "ann")}
    assert client.get("/api/batches", headers=auth["tom"]).json() == []
    assert client.get(f"/api/batches/{store.batch_id}/next",
                      headers=auth["tom"]).status_code == 403
    item = client.get(f"/api/batches/{store.batch_id}/next", headers=auth["ann"]).json()
    assert client.post(f"/api/items/{item['id']}/verdict", json={"passed": True},
                       headers=auth["tom"]).status_code == 403
    # ann may not judge the item she was not served
    other = next(i["id"] for i in store.items(store.batch_id) if i["id"] != item["id"])
    assert client.post(f"/api/items/{other}/verdict", json={"passed": True},
                       headers=auth["ann"]).status_code == 409
    assert store.verdict_rows(store.batch_id) == []
    store.dispose()


def test_sign_ins_are_limited_the_cookie_is_strict_and_docs_are_off(tmp_path):
    store, client = _app(tmp_path)
    token = store.add_reviewer("ann")
    for _ in range(3):
        assert client.post("/login", data={"token": "guess"}).status_code == 401
    assert client.post("/login", data={"token": token}).status_code == 429
    assert client.get("/api/me", headers={"Authorization": "Bearer guess"}).status_code == 429
    (tmp_path / "tls").mkdir()
    store2, tls = _app(tmp_path / "tls")
    tls.base_url = "https://testserver"  # the page came over TLS
    good = tls.post("/login", data={"token": store2.add_reviewer("ann")},
                    follow_redirects=False)
    cookie = good.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "secure" in cookie
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == 404
    store.dispose()
    store2.dispose()


def test_links_carry_no_credentials():
    from rlhf_tasks.tracking import ui_url

    cfg = config.validate({"tracking": {"tracking_uri": "https://bot:s3cret@mlflow.example/"}})
    assert ui_url(cfg) == "https://mlflow.example"


def test_verdicts_and_the_close_use_the_stores_clock(tmp_path, monkeypatch):
    """The review app's and the gate's clocks may disagree; the store's does not with
    itself: a process whose clock is years off still stamps verdicts and the close with
    the store's time, so no verdict given before the close is dropped."""
    from datetime import datetime, timezone

    from rlhf_tasks.panel import store as store_mod

    store = store_mod.PanelStore(f"sqlite:///{tmp_path}/p.db")
    batch = store.create_batch(pipeline="p", run_id="r", items=[
        {"prompt_index": 0, "prompt": "q", "response": "a", "model": "m"}],
        verdicts_per_item=1, quality_bar="bar", simulated=False)
    item = store.next_item(batch, "ann")
    monkeypatch.setattr(store_mod, "_now", lambda: datetime(2030, 1, 1, tzinfo=timezone.utc))
    store.record_verdict(item.id, "ann", True)  # the review app's clock runs years ahead
    monkeypatch.setattr(store_mod, "_now", lambda: datetime(2001, 1, 1, tzinfo=timezone.utc))
    closed = store.close_batch(batch)  # the gate's clock is years behind
    assert abs((closed - datetime.now(timezone.utc)).total_seconds()) < 120
    assert len(store.verdict_rows(batch)) == 1
    store.dispose()


def test_reference_answers_are_stripped_like_the_models():
    import pandas as pd

    from rlhf_tasks.steps.evaluate import reference_answers

    frame = pd.DataFrame({"reference": ["  Led a team of 5.\n", None, "   ", "Cut costs 10%."]})
    assert reference_answers(frame) == [(0, "Led a team of 5."), (3, "Cut costs 10%.")]
    assert reference_answers(pd.DataFrame({"prompt": ["x"]})) == []


def test_a_bake_off_task_trains_only_the_runs_own_candidates(tmp_path, monkeypatch):
    """The mapped value of a training task is an XCom (candidates' result), which a user
    may change: it only selects among the candidates the run's pinned config names, and
    the step comes from that config, never from the value (no 'gate' run as a training
    task).  Neither the form nor an admin file picks the task's candidate."""
    from airflow.sdk.exceptions import AirflowFailException

    from rlhf_airflow.operators.step import CANDIDATE_STEP, RlhfStepOperator
    from rlhf_airflow.params import build_config
    from rlhf_airflow.run_setup import prepare_run

    _admin(tmp_path, monkeypatch, "tuning: {algorithms: [ppo, grpo, dpo], candidate: dpo}\n"
                                  "ppo: {samples_per_prompt: 2}\n")
    prepared = prepare_run({}, "rlhf_tuning", "manual__1", conf={})
    cfg = config.load(prepared["config_uri"], sha256=prepared["config_sha256"])
    assert cfg.tuning.candidate is None  # the admin file's pick is dropped
    for given, step in (("grpo", "ppo"), ("dpo", "dpo")):
        op = RlhfStepOperator(task_id="tune", step=CANDIDATE_STEP, candidate=given)
        op._pin_config(_context(prepared))
        assert op.step == step and f"tuning.candidate={given}" in op.overrides
        assert op.unit == given
    for forged in ("gate", "promote", "rloo", "ppo\nx", None):
        op = RlhfStepOperator(task_id="tune", step=CANDIDATE_STEP, candidate=forged)
        with pytest.raises(AirflowFailException, match="not one of this run's candidates"):
            op._pin_config(_context(prepared))
        assert op.step == CANDIDATE_STEP
    with pytest.raises(BadInput, match="trigger form field 'tuning'"):
        build_config({"tuning": {"candidate": "grpo"}}, "rlhf_tuning", "manual__2",
                     conf={"tuning": {"candidate": "grpo"}})
