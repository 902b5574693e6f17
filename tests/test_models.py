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
