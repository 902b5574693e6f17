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
    assert registry.promote(cfg, name, first.version) == {"champion": "1", "previous": None}
    second = registry.register(cfg, storage, name=name, run_id=None, tags={"pass_rate": 0.87},
                               source=_model_folder(storage, cfg, "r2"))
    assert registry.promote(cfg, name, second.version) == {"champion": "2", "previous": "1"}
    client = registry.client(cfg)
    assert str(client.get_model_version_by_alias(name, "previous").version) == "1"
    assert registry.champion(cfg).tags["pass_rate"] == "0.87"
    third = registry.register(cfg, storage, name=name, run_id=None, tags={},
                              source=_model_folder(storage, cfg, "r3"))
    registry.reject(cfg, name, third.version, "lift over champion is not significant")
    rejected = client.get_model_version(name, third.version)
    assert rejected.tags["gate.decision"] == "reject" and not rejected.aliases
    assert str(registry.champion(cfg).version) == "2"
