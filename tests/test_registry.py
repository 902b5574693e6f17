"""The MLflow registry as the gate uses it: complete folders only, champion and previous."""

from __future__ import annotations

import pytest

from rlhf_tasks import registry
from rlhf_tasks.errors import BadInput
from rlhf_tasks.storage import Storage


def _model_folder(storage, cfg, run: str, complete: bool = True) -> str:
    uri = f"{cfg.storage.artifact_root}/p/{run}/ppo/model"
    storage.write_bytes(f"{uri}/adapter_model.safetensors", b"weights")
    if complete:
        storage.write_json(f"{uri}/MANIFEST.json", {"files": {}})
    return uri


def test_promotions_move_champion_and_keep_previous(make_config):
    cfg = make_config()
    storage = Storage.from_config(cfg)
    name = cfg.registry.model_name
    with pytest.raises(BadInput, match="without its MANIFEST.json"):
        registry.register(cfg, storage, name=name, run_id=None, tags={},
                          source=_model_folder(storage, cfg, "half", complete=False))
    first = registry.register(cfg, storage, name=name, run_id=None, tags={"pass_rate": 0.7},
                              source=_model_folder(storage, cfg, "r1"))
    again = registry.register(cfg, storage, name=name, run_id=None, tags={},
                              source=_model_folder(storage, cfg, "r1"))
    assert again.version == first.version  # a retried gate registers nothing new
    assert registry.champion(cfg) is None
    assert registry.promote(cfg, name, first.version, expected_champion=None) == \
        {"champion": "1", "previous": None}
    second = registry.register(cfg, storage, name=name, run_id=None, tags={"pass_rate": 0.87},
                               source=_model_folder(storage, cfg, "r2"))
    assert registry.promote(cfg, name, second.version, expected_champion="1") == \
        {"champion": "2", "previous": "1"}
    # a retry after the moves went through changes nothing
    assert registry.promote(cfg, name, second.version, expected_champion="1") == \
        {"champion": "2", "previous": "1"}
    client = registry.client(cfg)
    assert str(client.get_model_version_by_alias(name, "previous").version) == "1"
    assert registry.champion(cfg).tags["pass_rate"] == "0.87"
    third = registry.register(cfg, storage, name=name, run_id=None, tags={},
                              source=_model_folder(storage, cfg, "r3"))
    registry.reject(cfg, name, third.version, "lift over champion is not significant")
    rejected = client.get_model_version(name, third.version)
    assert rejected.tags["gate.decision"] == "reject" and not rejected.aliases
    assert str(registry.champion(cfg).version) == "2"


def test_promote_refuses_when_the_champion_moved_since_the_gate(make_config):
    cfg = make_config()
    storage = Storage.from_config(cfg)
    name = cfg.registry.model_name
    versions = [registry.register(cfg, storage, name=name, run_id=None, tags={},
                                  source=_model_folder(storage, cfg, f"r{i}")).version
                for i in range(3)]
    registry.promote(cfg, name, versions[0], expected_champion=None)
    # run B's gate compared against version 1; meanwhile run A promoted version 2
    registry.promote(cfg, name, versions[1], expected_champion="1")
    with pytest.raises(registry.ChampionChanged, match="version 2 now, not version 1"):
        registry.promote(cfg, name, versions[2], expected_champion="1")
    assert str(registry.champion(cfg).version) == "2"


def test_aliases_move_all_or_none(make_config, monkeypatch):
    """The reward model's champion move fails: the policy's champion and previous, already
    moved, are put back; the error is a fault (retried), and the retry succeeds."""
    import mlflow

    cfg = make_config()
    storage = Storage.from_config(cfg)
    name, reward = cfg.registry.model_name, registry.reward_model_name(cfg)
    for model in (name, reward):
        for i in range(2):
            registry.register(cfg, storage, name=model, run_id=None, tags={},
                              source=_model_folder(storage, cfg, f"{model}-{i}"))
    registry.promote(cfg, name, "1", expected_champion=None, reward=(reward, "1"))
    real = mlflow.MlflowClient.set_registered_model_alias
    calls = []

    def flaky(self, model, alias, version):
        calls.append((model, alias, version))
        if (model, alias, version) == (reward, "champion", "2"):
            raise ConnectionResetError("connection reset by peer")
        return real(self, model, alias, version)

    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", flaky)
    with pytest.raises(registry.RegistryFault, match="restored"):
        registry.promote(cfg, name, "2", expected_champion="1", reward=(reward, "2"))
    client = registry.client(cfg)
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert registry.alias_version(client, name, "previous") is None
    assert str(client.get_model_version_by_alias(reward, "champion").version) == "1"
    assert registry.alias_version(client, reward, "previous") is None
    assert (name, "champion", "2") in calls  # it had moved, and was put back
    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", real)
    registry.promote(cfg, name, "2", expected_champion="1", reward=(reward, "2"))
    for model in (name, reward):
        assert str(client.get_model_version_by_alias(model, "champion").version) == "2"
        assert str(client.get_model_version_by_alias(model, "previous").version) == "1"


def test_only_a_missing_alias_means_no_champion(make_config, monkeypatch):
    """An unreachable registry is a fault (exit 1, retried), never 'no champion'."""
    cfg = make_config()
    assert registry.champion(cfg) is None  # model not registered yet
    storage = Storage.from_config(cfg)
    registry.register(cfg, storage, name=cfg.registry.model_name, run_id=None, tags={},
                      source=_model_folder(storage, cfg, "r1"))
    assert registry.champion(cfg) is None  # registered, no alias yet
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    from conftest import free_port

    down = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(
        update={"tracking_uri": f"http://127.0.0.1:{free_port()}"})})
    with pytest.raises(Exception) as err:
        registry.champion(down)
    assert not isinstance(err.value, BadInput)  # exit 1: Airflow retries
    import mlflow

    dead = mlflow.MlflowClient(tracking_uri=down.tracking.tracking_uri,
                               registry_uri=down.tracking.tracking_uri)
    with pytest.raises(registry.RegistryFault, match="alias 'champion'"):
        registry.alias_version(dead, cfg.registry.model_name, "champion")


@pytest.mark.parametrize("run, error", [
    ({}, "only the sign_off task promotes"),
    ({"approved_by": "bob"}, "came from 'bob', not from the assigned approver '7'"),
    ({"approved_by": "alice"}, "not from the assigned approver '7'"),  # a name is no id
    ({"approved_by": "7", "triggered_by": "alice"}, "id of 'alice'.*is unknown"),
    ({"approved_by": "7", "triggered_by": "tom", "triggered_by_id": "7"},
     "triggered this run"),
])
def test_promote_needs_airflows_approval_by_the_approver(make_config, tmp_path, run, error):
    """The approval is the run.approved_by the sign-off task puts on the promote step's
    command line; a file in the store is no approval (written here, and ignored)."""
    from rlhf_tasks.steps.panel import SIGN_OFF_FILE, check_sign_off

    cfg = make_config(panel={"approver": "7"}, run=run)
    Storage.from_config(cfg).write_json(cfg.step_uri(*SIGN_OFF_FILE), {
        "chosen_options": ["Approve"], "responded_by_user": {"id": "7"}})
    with pytest.raises(BadInput, match=error):
        check_sign_off(cfg)


def test_an_approval_counts_only_from_the_approver_who_did_not_trigger(make_config):
    from rlhf_tasks.steps.panel import check_sign_off

    ok = make_config(panel={"approver": "7"}, run={"approved_by": "7", "triggered_by": "tom",
                                                   "triggered_by_id": "12"})
    assert check_sign_off(ok) == "7"
    assert check_sign_off(make_config()) is None  # no approver: no sign-off


def test_a_rejected_or_unanswered_sign_off_is_recorded_and_tagged(make_config, tmp_path):
    """The sign-off task writes the response where promote reads it, and a Reject (or no
    answer before panel.sign_off_timeout_hours: the default option) tags the version."""
    import sys
    from datetime import datetime, timezone
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
    from rlhf_airflow.operators.sign_off import SignOffOperator
    from rlhf_tasks.steps.panel import SIGN_OFF_FILE

    cfg = make_config(panel={"approver": "alice", "sign_off_timeout_hours": 2})
    storage = Storage.from_config(cfg)
    name = cfg.registry.model_name
    version = registry.register(cfg, storage, name=name, run_id=None, tags={},
                                source=_model_folder(storage, cfg, "r1")).version
    storage.write_json(cfg.step_uri("gate", "gate.json"),
                       {"model_name": name, "version": version})
    op = SignOffOperator(task_id="sign_off", subject="s")
    assert op.defaults == ["Reject"] and op.ignore_downstream_trigger_rules
    op._config = lambda context: cfg  # the run's pinned config (resolved from the run)
    op._record({}, {"chosen_options": ["Reject"], "responded_by_user": {"id": "alice"},
                    "responded_at": datetime(2026, 1, 1, tzinfo=timezone.utc)}, timed_out=False)
    recorded = storage.read_json(cfg.step_uri(*SIGN_OFF_FILE))
    assert recorded["chosen_options"] == ["Reject"] and recorded["approver"] == "alice"
    tags = registry.client(cfg).get_model_version(name, version).tags
    assert tags["gate.decision"] == "sign_off_rejected"
    assert tags["gate.reason"] == "sign-off rejected by alice"
    op._record({}, {"chosen_options": ["Reject"], "responded_by_user": None,
                    "responded_at": None}, timed_out=True)
    tags = registry.client(cfg).get_model_version(name, version).tags
    assert tags["gate.reason"] == "sign-off rejected by nobody (timed out)"


def test_a_crash_between_alias_moves_is_repaired_by_the_next_try(make_config, monkeypatch):
    """The process dies after the policy's champion moved and before the reward model's
    (no undo runs): the next try reads the journal, finds the policy already champion and
    still completes the reward model's moves; a forged journal moves nothing else."""
    import mlflow

    cfg = make_config()
    storage = Storage.from_config(cfg)
    name, reward = cfg.registry.model_name, registry.reward_model_name(cfg)
    for model in (name, reward):
        for i in range(3):
            registry.register(cfg, storage, name=model, run_id=None, tags={},
                              source=_model_folder(storage, cfg, f"{model}-{i}"))
    registry.promote(cfg, name, "1", expected_champion=None, reward=(reward, "1"))
    journal = (storage, cfg.step_uri("promote", "alias_moves.json"))
    real = mlflow.MlflowClient.set_registered_model_alias

    class Killed(BaseException):  # not an Exception: no undo runs, as with SIGKILL
        pass

    def dies(self, model, alias, version):
        if model == reward:
            raise Killed()
        return real(self, model, alias, version)

    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", dies)
    with pytest.raises(Killed):
        registry.promote(cfg, name, "2", expected_champion="1", reward=(reward, "2"),
                         journal=journal)
    client = registry.client(cfg)
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    assert str(client.get_model_version_by_alias(reward, "champion").version) == "1"
    assert storage.read_json(journal[1])["status"] == "pending"
    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", real)
    assert registry.promote(cfg, name, "2", expected_champion="1", reward=(reward, "2"),
                            journal=journal)["champion"] == "2"
    for model in (name, reward):
        assert str(client.get_model_version_by_alias(model, "champion").version) == "2"
        assert str(client.get_model_version_by_alias(model, "previous").version) == "1"
    assert storage.read_json(journal[1])["status"] == "done"
    # whoever writes the store cannot make a retry move the champion elsewhere
    storage.write_json(journal[1], {"status": "pending", "previous": "1",
                                    "moves": [[name, "champion", "3"]]})
    with pytest.raises(registry.RegistryFault, match="would not make"):
        registry.promote(cfg, name, "2", expected_champion="1", reward=(reward, "2"),
                         journal=journal)
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
