"""What the training steps (reward, sft, ppo) share: token layout, data, checkpoints, metrics.

* Token layout, the same in every step, in evaluation and in the served model:
  ``renderer.prompt_ids(prompt) + renderer.response_ids(response)`` (:mod:`rlhf_tasks.prompting`),
  so the reward model scores exactly the sequences PPO generates.
* Precision: weights load in ``compute.dtype``; what is trained keeps fp32 master copies
  (:func:`rlhf_tasks.models.upcast_trainable`) and the forward runs under autocast.
* Checkpoints live in the artifact store under ``<step>/checkpoints/<name>-<n>/`` with a
  manifest written last; a rerun (an Airflow retry) downloads the newest whole one and
  resumes from it.
* Hugging Face ``Trainer`` logs go to MLflow under the step's namespace (``reward/loss``)
  through :class:`MlflowMetrics`, not through the Trainer's own MLflow integration, which
  would open runs of its own.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from pathlib import Path

from rlhf_tasks import tracking
from rlhf_tasks.errors import BadInput
from rlhf_tasks.progress import Progress
from rlhf_tasks.storage import MANIFEST, Storage, join

log = logging.getLogger(__name__)


def resolve_device(cfg) -> str:
    import torch

    if cfg.compute.device == "cuda" and not torch.cuda.is_available():
        raise BadInput("compute.device is 'cuda' but no CUDA device is visible",
                       field="compute.device")
    if cfg.compute.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.compute.device


def precision_tag(cfg) -> dict[str, str]:
    """The precision a GPU step computes in (``compute.dtype`` with ``auto`` resolved), as
    the tag its MLflow run carries: ``compute.dtype_used``."""
    from rlhf_tasks.models import compute_dtype, dtype_name

    return {"compute.dtype_used": dtype_name(compute_dtype(cfg, resolve_device(cfg)))}


def autocast(cfg, device: str):
    """Autocast to ``compute.dtype`` (a no-op in fp32)."""
    import torch

    from rlhf_tasks.models import compute_dtype

    dtype = compute_dtype(cfg, device)
    return torch.autocast("cuda" if device == "cuda" else "cpu", dtype=dtype,
                          enabled=dtype != torch.float32)


# -- token layout ---------------------------------------------------------------------------
def prompt_rows(frame) -> list[tuple[str, list | None]]:
    """(prompt text, conversation or None) of each canonical row."""
    from rlhf_tasks.prompting import parse_messages

    messages = frame["messages"] if "messages" in frame else [None] * len(frame)
    return [(p, parse_messages(m)) for p, m in zip(frame["prompt"], messages)]


def encode_prompts(renderer, frame) -> list[list[int]]:
    return [renderer.prompt_ids(p, m) for p, m in prompt_rows(frame)]


def encode_pairs(renderer, frame) -> dict[str, list[list[int]]]:
    """Preference pairs in the token layout: each prompt's ids (``prompt_ids``) and each
    response's ids after it, ending with the stop token (``chosen_ids``, ``rejected_ids``;
    the columns TRL's DPOTrainer reads)."""
    return {"prompt_ids": encode_prompts(renderer, frame),
            "chosen_ids": [renderer.response_ids(t) for t in frame["chosen"]],
            "rejected_ids": [renderer.response_ids(t) for t in frame["rejected"]]}


# -- data -----------------------------------------------------------------------------------
def read_canonical(cfg, storage: Storage, kind: str, *, mlflow_context: str | None = None):
    """The validated data of ``kind`` (from its validate step), as a DataFrame.  With
    ``mlflow_context`` the active MLflow run logs it as an input dataset (its validate
    step's digest, its source, its row count)."""
    import pandas as pd

    folder = cfg.step_uri(f"validate_{kind}")
    uri = join(folder, "canonical.parquet")
    if not storage.exists(uri):
        raise BadInput(f"no validated {kind} data: run validate_{kind} first", file=uri)
    with storage.local_copy(uri) as path:
        frame = pd.read_parquet(path)
    if mlflow_context:
        manifest = storage.read_json(join(folder, MANIFEST))
        tracking.log_dataset(frame, name=kind, source=uri,
                             digest=manifest.get("digest")
                             or manifest["files"]["canonical.parquet"]["sha256"],
                             context=mlflow_context)
    return frame


def split_by_prompt(frame, fraction: float, seed: int):
    """Hold out ``fraction`` of the prompts (all their rows), so no prompt is in both."""
    prompts = sorted(set(frame["prompt"]))
    random.Random(seed).shuffle(prompts)
    held = set(prompts[: round(len(prompts) * fraction)])
    mask = frame["prompt"].isin(held)
    return frame[~mask].reset_index(drop=True), frame[mask].reset_index(drop=True)


# -- checkpoints ----------------------------------------------------------------------------
def latest_checkpoint(storage: Storage, checkpoints_uri: str) -> tuple[str, int] | None:
    """The newest whole checkpoint under ``checkpoints_uri``: (its URI, its number)."""
    best = None
    for uri in storage.list(checkpoints_uri):
        name = uri[len(checkpoints_uri.rstrip("/")) + 1:]
        match = re.fullmatch(r"([A-Za-z]+-(\d+))/" + re.escape(MANIFEST), name)
        if match and (best is None or int(match.group(2)) > best[1]):
            best = (join(checkpoints_uri, match.group(1)), int(match.group(2)))
    return best


def resume_key(cfg, storage: Storage, step: str, inputs: tuple[str, ...]) -> str:
    """What a checkpoint must have been made from to be resumed: the step's config section
    (but ``checkpoint_every`` and ``train_steps``: training longer or shorter continues the
    same run; nor the drift warnings' bounds), the model, precision and seed, and the
    digests of its input folders' manifests (validated data, the reward model).  A checkpoint made under another config
    or from other data is refused, never silently continued."""
    import hashlib

    section = getattr(cfg, step).model_dump(mode="json")
    for name in ("checkpoint_every", "train_steps", "drift"):
        section.pop(name, None)
    digests = {}
    for folder in inputs:
        uri = join(cfg.step_uri(folder), MANIFEST)
        manifest = storage.read_json(uri) if storage.exists(uri) else {}
        digests[folder] = {name: meta.get("sha256") for name, meta in
                           sorted((manifest.get("files") or {}).items())}
    material = {"step": step, "section": section, "model": cfg.model.model_dump(mode="json"),
                "dtype": cfg.compute.dtype, "seed": cfg.run.seed, "inputs": digests}
    if cfg.compute.strategy != "ddp":  # its checkpoints hold the optimizer state by name
        material["strategy"] = cfg.compute.strategy
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def fetch_latest_checkpoint(storage: Storage, checkpoints_uri: str, local_root: Path,
                            key: str) -> Path | None:
    """Download the newest whole checkpoint into ``local_root/<name>``; None if there is
    none; BadInput when it was made under another config or data (``key``)."""
    found = latest_checkpoint(storage, checkpoints_uri)
    if found is None:
        return None
    uri, number = found
    made_from = storage.read_json(join(uri, MANIFEST)).get("resume_key")
    if made_from != key:
        raise BadInput(f"checkpoint {uri} was made from another config or other data "
                       f"(resume key {str(made_from)[:12]} != {key[:12]}): start a new run, "
                       "or delete its checkpoints to start this step over",
                       file=join(uri, MANIFEST), field="resume_key")
    target = Path(local_root) / uri.rstrip("/").rsplit("/", 1)[-1]
    storage.get_dir(uri, target)
    log.info("resuming from checkpoint %s (step %d)", uri, number)
    return target


def checkpoint_step(folder: Path | None) -> int:
    """The number of a checkpoint folder (``checkpoint-N``, ``update-N``); 0 for none."""
    return int(Path(folder).name.rsplit("-", 1)[1]) if folder else 0


def upload_checkpoint(storage: Storage, local_dir: Path, checkpoints_uri: str, step: int,
                      key: str, gather=None, first: bool = True) -> str:
    """Upload a checkpoint folder; its manifest (last) makes it whole.  ``gather`` (an
    all-gather of Python objects over the processes): a sharded checkpoint, each process
    uploading its own files, the ``first`` writing the manifest of them all once every
    process has uploaded."""
    uri = join(checkpoints_uri, Path(local_dir).name)
    extra = {"step": step, "resume_key": key}
    if gather is None:
        storage.put_dir(local_dir, uri, extra=extra)
        return uri
    files: dict = {}
    for part in gather(storage.put_files(local_dir, uri)):
        files.update(part)
    if first:
        storage.write_manifest(uri, dict(sorted(files.items())), extra)
    gather(None)  # nobody goes on (or resumes) before the manifest exists
    return uri


def trainer_callbacks(namespace: str, storage: Storage, checkpoints_uri: str, key: str):
    """Hugging Face Trainer callbacks: metrics to MLflow, checkpoints to the artifact store."""
    from transformers import TrainerCallback

    class MlflowMetrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            metrics = {}
            for key, value in (logs or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    name = key.replace("eval_", "eval/", 1) if key.startswith("eval_") else (
                        f"train/{key}")
                    metrics[name] = value
            if metrics:
                tracking.log_metrics(namespace, metrics, step=state.global_step)

    class ProgressLog(TrainerCallback):
        """Steps, rate and ETA in the task log (the Trainer's own bar needs a terminal)."""

        meter = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.meter = Progress(state.max_steps - state.global_step,
                                      f"{namespace} training", unit="steps")

        def on_step_end(self, args, state, control, **kwargs):
            if self.meter is not None:
                self.meter.update(1)

        def on_train_end(self, args, state, control, **kwargs):
            if self.meter is not None:
                self.meter.close()

    class CheckpointSync(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.is_dir():
                    upload_checkpoint(storage, folder, checkpoints_uri, state.global_step, key)

    return [MlflowMetrics(), ProgressLog(), CheckpointSync()]


def trainer_common_args(cfg, *, output_dir: Path, steps: int, batch_size: int,
                        learning_rate: float, checkpoint_every: int) -> dict:
    """Settings every TRL trainer here shares (TRL's *Config classes take them all): the
    Trainer's mixed precision is autocast over fp32 trainable weights."""
    import sys

    import torch

    from rlhf_tasks.models import compute_dtype

    device = resolve_device(cfg)
    dtype = compute_dtype(cfg, device)
    return dict(bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                **sharding_args(cfg, device),
                output_dir=str(output_dir), max_steps=steps,
                per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
                learning_rate=learning_rate, lr_scheduler_type="linear",
                warmup_steps=max(1, steps // 20), logging_steps=max(1, min(10, steps // 10)),
                save_strategy="steps", save_steps=checkpoint_every, save_total_limit=2,
                report_to="none", seed=cfg.run.seed, data_seed=cfg.run.seed,
                use_cpu=device == "cpu", dataloader_num_workers=0,
                disable_tqdm=not sys.stderr.isatty(), eval_strategy="no")


def sharding_args(cfg, device: str) -> dict:
    """``compute.strategy`` for the TRL trainers.  fsdp on several processes: FSDP2
    through accelerate (each decoder layer a unit, by the model's ``_no_split_modules``;
    resharded after forward; sharded checkpoints; FSDP's own activation checkpointing,
    which spares the extra all-gather of the Trainer's).  accelerate shards on GPUs only:
    on CPU the processes stay DDP replicas, and the log says so."""
    checkpointing = cfg.compute.gradient_checkpointing
    plain = {"activation_checkpointing": checkpointing,
             "activation_checkpointing_kwargs": {"use_reentrant": False}}
    if cfg.compute.strategy != "fsdp" or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return plain
    if device == "cpu":
        log.warning("compute.strategy fsdp: accelerate shards on GPUs only; these CPU "
                    "processes train as DDP replicas")
        return plain
    return {"fsdp": True, "activation_checkpointing": False,
            "fsdp_config": {"version": 2, "reshard_after_forward": True,
                            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                            "state_dict_type": "SHARDED_STATE_DICT",
                            "activation_checkpointing": checkpointing}}


def learning_rate(base_lora: float, base_full: float, lora_rank: int, multiplier: float) -> float:
    return (base_lora if lora_rank > 0 else base_full) * multiplier


def trainable_model(model, section, task_type: str, modules_to_save: list[str] | None = None):
    """``model`` with the step's LoRA adapter (or, with rank 0, every weight trainable), its
    trainable weights in fp32.  Wrapped here, not by the TRL trainer, so a trained head is
    upcast too."""
    from rlhf_tasks.models import upcast_trainable

    if section.lora_rank > 0:
        from peft import get_peft_model

        from rlhf_tasks.rl.models import lora_config

        model = get_peft_model(model, lora_config(section, task_type, modules_to_save))
    else:
        model.requires_grad_(True)
    upcast_trainable(model)
    return model


def log_model_reference(cfg, storage: Storage) -> dict:
    """The base model's resolved revision and weights digest as params of the step's run."""
    import mlflow

    from rlhf_tasks.models import describe

    described = describe(cfg, storage)
    mlflow.log_params({k: v for k, v in described.items() if k != "model.resolved_path"})
    return described


def save_tuned_policy(cfg, storage: Storage, step: str, policy, tokenizer, renderer,
                      folder: Path, *, lora_rank: int, merge: bool = False,
                      files: dict[str, str] | None = None) -> tuple[str, str]:
    """A tuned policy's two outputs, each folder whole (manifest last):
    ``<step>/model`` (the adapter or full weights, the tokenizer, the prompt format, the
    step's own ``files``; ``merged/`` with ``merge``, and always after an SFT start: an
    adapter trained over the SFT weights is usable only merged) and ``<step>/served`` (the
    MLflow model the registry serves: merged weights, tokenizer, prompt format, the
    evaluation's decoding).  Returns their URIs."""
    from rlhf_tasks import serving

    model_dir = folder / "model"
    policy = policy.cpu()
    policy.save_pretrained(model_dir, safe_serialization=True)
    merged = policy.merge_and_unload() if lora_rank else policy
    if lora_rank and (merge or cfg.rl_start == "sft"):
        merged.save_pretrained(model_dir / "merged", safe_serialization=True)
        tokenizer.save_pretrained(model_dir / "merged")
    tokenizer.save_pretrained(model_dir)
    renderer.save(model_dir)
    for name, text in (files or {}).items():
        (model_dir / name).write_text(text)
    model_uri, served_uri = cfg.step_uri(step, "model"), cfg.step_uri(step, "served")
    storage.put_dir(model_dir, model_uri,
                    extra={"step": step, "kind": "lora" if lora_rank else "full"})
    served = serving.save_policy_model(folder / "served", merged, tokenizer, renderer,
                                       serving.decoding_from_config(cfg, renderer))
    storage.put_dir(served, served_uri, extra={"step": step})
    return model_uri, served_uri
