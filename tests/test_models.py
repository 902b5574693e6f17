"""Model loading: real from_pretrained on a local folder or S3, safetensors only."""

import pytest

from rlhf_tasks import config
from rlhf_tasks.errors import BadInput
from rlhf_tasks.storage import Storage


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, demo_dir):
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=800, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2))
    model.save_pretrained(out)
    for f in (demo_dir / "foundation").iterdir():
        shutil.copy(f, out / f.name)
    return out


def test_loads_local_safetensors(tiny_model_dir):
    from rlhf_tasks.models import load_causal_lm, load_tokenizer

    cfg = config.validate({"model": {"base_model": str(tiny_model_dir)}})
    model = load_causal_lm(cfg)
    assert model.config.num_hidden_layers == 1
    assert load_tokenizer(cfg).pad_token == "<pad>"


def test_refuses_pickle_weights(tmp_path, tiny_model_dir):
    from rlhf_tasks.models import load_causal_lm

    for f in ("config.json",):
        (tmp_path / f).write_bytes((tiny_model_dir / f).read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    cfg = config.validate({"model": {"base_model": str(tmp_path)}})
    with pytest.raises(BadInput, match="no \\*.safetensors weights.*pytorch_model.bin"):
        load_causal_lm(cfg)


def test_missing_model_folder(tmp_path):
    from rlhf_tasks.models import load_causal_lm

    cfg = config.validate({"model": {"base_model": str(tmp_path / "nope")}})
    with pytest.raises(BadInput, match="model folder not found"):
        load_causal_lm(cfg)


def test_loads_from_s3(tmp_path, tiny_model_dir, s3_endpoint, bucket, monkeypatch):
    from rlhf_tasks.models import load_causal_lm

    storage = Storage(f"s3://{bucket}/models", s3_endpoint_url=s3_endpoint)
    storage.put_dir(tiny_model_dir, f"s3://{bucket}/models/tiny")
    monkeypatch.chdir(tmp_path)
    cfg = config.validate({"model": {"base_model": f"s3://{bucket}/models/tiny"}})
    model = load_causal_lm(cfg, storage)
    assert model.config.hidden_size == 16
    assert list((tmp_path / ".rlhf" / "cache" / "models").iterdir())


def fake_hub_cache(root, repo_id: str, model_dir, commit: str = "a" * 40):
    """A Hugging Face cache entry laid out as ``hf download`` leaves it: blobs named by
    their sha256 (for LFS files), snapshot files as symlinks, ``refs/main``."""
    import hashlib
    import os

    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in model_dir.iterdir():
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
    return snapshot


def test_hub_id_resolves_through_the_local_cache(tmp_path, tiny_model_dir, monkeypatch):
    from huggingface_hub import constants

    from rlhf_tasks import models
    from rlhf_tasks.storage import sha256_file

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = fake_hub_cache(tmp_path / "hub", "acme/tiny-chat", tiny_model_dir)
    cfg = config.validate({"model": {"base_model": "acme/tiny-chat"}})
    assert models.base_model_dir(cfg) == snapshot
    assert models.load_causal_lm(cfg).config.hidden_size == 16
    described = models.describe(cfg)
    assert described["model.resolved_revision"] == "a" * 40
    # the digest: sha256 over "name:sha256" of the weights (here read off the blob names)
    import hashlib

    weights = sorted(tiny_model_dir.glob("*.safetensors"))
    expected = "\n".join(f"{w.name}:{sha256_file(w)}" for w in weights)
    assert described["model.weights_sha256"] == hashlib.sha256(expected.encode()).hexdigest()
    # a revision that is not cached: refused, naming the id and the cache folder
    cfg = config.validate({"model": {"base_model": "acme/tiny-chat", "revision": "b" * 40}})
    with pytest.raises(BadInput, match=f"acme/tiny-chat.*{'b' * 40}.*{tmp_path / 'hub'}"):
        models.base_model_dir(cfg)


def test_uncached_hub_id_exits_2_with_one_line(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{base_model: acme/not-here}}\nstorage: {{artifact_root: "
                   f"{tmp_path / 'a'}}}\ntracking: {{tracking_uri: 'sqlite:///{tmp_path}/m.db'}}\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n')
    proc = subprocess.run([sys.executable, "-m", "rlhf_tasks.cli", "data", "validate",
                           str(tmp_path / "p.jsonl"), "--kind", "prompt", "--config", str(cfg),
                           "--tokenizer", "acme/not-here"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "acme/not-here" in line]
    assert len(errors) == 1 and str(tmp_path / "hub") in errors[0], proc.stderr


def test_auto_precision_is_bf16_only_where_bf16_is_fast(monkeypatch, make_config, caplog):
    """compute.dtype auto: bf16 on a CPU whose flags list AMX bf16 tiles (avx512_bf16
    alone is not enough: its bf16 matmuls are not the several-fold faster kind), fp32
    otherwise; the choice is logged with its reason; an explicit dtype is kept."""
    import logging

    import torch

    from rlhf_tasks import models

    amx = "processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
    plain = "processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\n"
    assert models.cpu_has_amx_bf16(amx) and not models.cpu_has_amx_bf16(plain)
    assert not models.cpu_has_amx_bf16("model name\t: amx_bf16 in a name, not a flag\n")
    cfg = make_config()
    assert cfg.compute.dtype == "auto"
    monkeypatch.setattr(models, "_REPORTED", set())
    with caplog.at_level(logging.INFO, logger="rlhf_tasks.models"):
        monkeypatch.setattr(models, "cpu_has_amx_bf16", lambda: True)
        assert models.compute_dtype(cfg, "cpu") == torch.bfloat16
        monkeypatch.setattr(models, "cpu_has_amx_bf16", lambda: False)
        assert models.compute_dtype(cfg, "cpu") == torch.float32
    said = [r.getMessage() for r in caplog.records]
    assert "compute.dtype auto: bf16 on a CPU with AMX bf16 tiles" in said
    assert "compute.dtype auto: fp32 on a CPU without AMX bf16" in said
    monkeypatch.setattr(models, "cpu_has_amx_bf16", lambda: True)
    assert models.compute_dtype(make_config(compute={"dtype": "fp32"}), "cpu") == torch.float32
    assert models.dtype_name(torch.bfloat16) == "bf16"
