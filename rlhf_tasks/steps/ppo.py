"""The ``ppo`` step: tune the policy against the reward model with the project's RL loop
(``ppo.algorithm``: PPO, RLOO, GRPO or Dr. GRPO; the step keeps PPO's name).

Inputs: ``validate_prompt/canonical.parquet``, ``reward/model/`` and, when RL starts from
the SFT policy, ``sft/model/``.  Where RL starts (``ppo.init_from``, by default ``sft``
when the run trains SFT): the SFT policy, its LoRA adapter merged into the base weights,
or ``model.base_model``.  The KL reference is that starting policy: in the ``shared``
layout the PPO adapter sits on the merged SFT weights, and disabling it gives the SFT
policy itself (one copy of the weights; two stacked adapters would need PEFT to disable
one of two, and the merge is what the served SFT model computes anyway).  The reward
normalisation is measured on the starting policy's samples (the reward step measured it
on the foundation model's).  The value model starts from the reward model, its head on
the normalised scale.
Outputs under ``<run>/ppo/`` (a bake-off's RL candidate: ``<run>/<algorithm>/``, the
task's ``tuning.candidate``): ``model/`` (the policy's LoRA adapter in safetensors, the
tokenizer, ``prompt_format.json``, ``ppo_summary.json``, and ``merged/`` when
``ppo.merge_adapter``), ``served/`` (the MLflow pyfunc model the registry holds: merged
weights, tokenizer, prompt format and decoding),
``checkpoints/update-N/`` every ``ppo.checkpoint_every`` updates; a rerun resumes from the
newest and ends with the weights an uninterrupted run would have.  A policy that started
from SFT is always saved merged too (``model/merged``): its adapter alone needs the SFT
weights under it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from rlhf_tasks import models, tracking, training
from rlhf_tasks.errors import BadInput
from rlhf_tasks.storage import Storage, join

log = logging.getLogger(__name__)


def starting_policy(cfg, storage: Storage, local: Path, **load_kwargs):
    """The causal LM RL starts from (and keeps as its KL reference): the base model, or
    the run's SFT model (a LoRA adapter merged into the base weights, or full weights)."""
    if cfg.rl_start == "foundation":
        return models.load_causal_lm(cfg, storage, **load_kwargs)
    sft_uri = cfg.step_uri("sft", "model")
    if not storage.is_complete(sft_uri):
        raise BadInput("ppo.init_from is 'sft' but this run has no SFT model: the sft step "
                       "must finish first", file=sft_uri, field="ppo.init_from")
    folder = storage.get_dir(sft_uri, local)
    if (folder / "adapter_config.json").exists():
        from peft import PeftModel

        base = models.load_causal_lm(cfg, storage, **load_kwargs)
        return PeftModel.from_pretrained(base, folder).merge_and_unload()
    return models.load_causal_lm(cfg, storage, path=str(folder), **load_kwargs)


def rl_data_description(cfg, prompts: int | None, pairs: int | None) -> str:
    """What the RL policy was made from, for the table's data column and the registry:
    "SFT + 1,500 prompts, 4,000 preference pairs"."""
    text = f"{prompts or 0:,} prompts, {pairs or 0:,} preference pairs"
    return f"SFT + {text}" if cfg.rl_start == "sft" else text


def drift_warnings(history: list[dict], bounds) -> list[str]:
    """The RL curves' warnings (``ppo.drift``), read on the last update: KL, its slope,
    entropy, clip fraction, and the response length against the first update's."""
    if not history:
        return []
    first, last = history[0], history[-1]
    out = []
    checks = (("kl", bounds.kl_above, "KL to the reference {:.3f} is above {}"),
              ("kl_slope", bounds.kl_slope_above, "KL still grows by {:.3f} per update "
                                                  "(above {})"),
              ("policy_clipfrac", bounds.clipfrac_above, "policy clip fraction {:.3f} is "
                                                          "above {}"))
    for key, bound, text in checks:
        if bound is not None and last.get(key, 0.0) > bound:
            out.append("ppo: " + text.format(last[key], bound))
    if bounds.entropy_below is not None and last.get("entropy", 1.0) < bounds.entropy_below:
        out.append(f"ppo: entropy {last['entropy']:.3f} is below {bounds.entropy_below} "
                   "(the policy is collapsing onto few answers)")
    ratio = bounds.length_ratio_above
    if ratio is not None and first.get("response_length") and last.get("response_length"):
        change = last["response_length"] / first["response_length"]
        if change > ratio or change < 1 / ratio:
            out.append(f"ppo: mean response length went from {first['response_length']:.1f} "
                       f"to {last['response_length']:.1f} tokens (more than {ratio}x)")
    return out


def _accelerator(cfg):
    """An Accelerator when launched by ``accelerate launch`` on several processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=training.resolve_device(cfg) == "cpu")


def ppo(cfg, stop_after: int | None = None) -> dict:
    import torch

    from rlhf_tasks.rl import trainer as rl_trainer
    from rlhf_tasks.rl.advantages import estimator
    from rlhf_tasks.rl.checkpoints import weights_digest
    from rlhf_tasks.rl.distributed import Processes, gather_weights
    from rlhf_tasks.rl.models import build_models
    from rlhf_tasks.rl.settings import rl_settings
    from rlhf_tasks.reward_model import load_reward_model

    candidate = cfg.candidate_for("ppo")  # a bake-off's task trains one of several
    cfg = cfg.for_candidate(candidate)
    storage = Storage.from_config(cfg)
    out_uri = cfg.step_uri(candidate.folder)
    checkpoints_uri = join(out_uri, "checkpoints")
    device = training.resolve_device(cfg)
    accelerator = _accelerator(cfg)
    # under `accelerate launch` every process trains; only the first tracks and saves
    main = accelerator is None or accelerator.is_main_process
    run = (tracking.step_run(cfg, "ppo", name=candidate.folder,
                             tags={"ppo.algorithm": cfg.ppo.algorithm,
                                   "rlhf.candidate": candidate.label,
                                   "ppo.model_layout": cfg.ppo.model_layout,
                                   "ppo.lora_rank": str(cfg.ppo.lora_rank),
                                   "ppo.init_from": cfg.rl_start,
                                   **training.precision_tag(cfg)},
                             system_metrics=True)
           if main else contextlib.nullcontext(None))
    with run as run_id, tempfile.TemporaryDirectory(prefix="rlhf-ppo-") as tmp:
        tmp = Path(tmp)
        if main:
            training.log_model_reference(cfg, storage)
        tokenizer = models.load_tokenizer(cfg, storage)
        renderer = models.renderer(cfg, tokenizer, storage)
        base_dir = models.base_model_dir(cfg, storage)
        reward_dir = storage.get_dir(cfg.step_uri("reward", "model"), tmp / "reward")
        reward_model, info = load_reward_model(
            reward_dir, base_model_dir=base_dir, trust_remote_code=cfg.model.trust_remote_code,
            **models.load_kwargs(cfg, device, trainable=False))
        prompt_frame = training.read_canonical(cfg, storage, "prompt",
                                               mlflow_context="training" if main else None)
        prompts = training.encode_prompts(renderer, prompt_frame)
        policy = starting_policy(cfg, storage, tmp / "sft", **models.load_kwargs(
            cfg, device, trainable=cfg.ppo.lora_rank == 0))
        norm = info["normalisation"]
        if cfg.rl_start != "foundation":  # rewards start near 0 / 1 for *this* policy
            from rlhf_tasks.steps.reward import score_moments

            reward_model.to(device)
            norm = score_moments(policy.to(device).eval(), reward_model, prompt_frame,
                                 tokenizer, renderer, cfg, device)
            log.info("ppo: reward normalisation on the %s policy's samples: mean %.3f, std "
                     "%.3f", cfg.rl_start, norm["mean"], norm["std"])
        settings = rl_settings(cfg, norm["mean"], norm["std"])
        torch.manual_seed(cfg.run.seed)  # LoRA initialisation: the same on every rerun
        stack = build_models(policy, reward_model, lora=cfg.ppo, layout=cfg.ppo.model_layout,
                             critic=estimator(settings.algorithm).need_critic,
                             score_mean=norm["mean"], score_std=norm["std"])
        for model in filter(None, (stack.policy, stack.critic, stack.reference, stack.reward)):
            model.to(device)

        inputs = ("validate_prompt", "reward/model") + (
            ("sft/model",) if cfg.rl_start == "sft" else ())
        key = training.resume_key(cfg, storage, "ppo", inputs)
        resume = training.fetch_latest_checkpoint(storage, checkpoints_uri, tmp / "resume", key)

        def on_metrics(update: int, metrics: dict) -> None:
            if main:
                tracking.log_metrics("ppo", metrics, step=update)

        processes = Processes(accelerator, settings.strategy)
        rank, world = processes.rank, processes.world

        def on_checkpoint(update: int, folder: Path) -> None:
            # replicas: the first process alone has it all; shards: every process uploads
            # its own, the first writes the manifest of all
            training.upload_checkpoint(
                storage, folder, checkpoints_uri, update, key, first=main,
                gather=processes.gather_objects if processes.sharded else None)

        started = time.perf_counter()
        result = rl_trainer.train(
            stack, prompts, settings, eos_token_id=renderer.stop_ids,
            pad_token_id=tokenizer.pad_token_id, device=device, resume_from=resume,
            checkpoint_dir=tmp / "checkpoints", on_checkpoint=on_checkpoint,
            on_metrics=on_metrics, stop_after=stop_after, accelerator=accelerator)
        if result.updates < settings.train_steps:  # stopped early on purpose (tests)
            return {"updates": result.updates, "stopped_early": True, "mlflow_run_id": run_id}
        if processes.sharded:  # whole weights again, for saving
            gather_weights(stack.policy)
        # every process, on every machine, says what it ended with: one digest in all the
        # logs of a multi-process run is the proof that it stayed in step
        digest = weights_digest(stack.policy)
        log.info("ppo: trainable weights sha256 %s (process %d of %d)", digest, rank, world)
        if not main:
            return {"updates": result.updates, "rank": rank}

        first, last = result.history[0], result.history[-1]
        warnings = drift_warnings(result.history, cfg.ppo.drift)
        for warning in warnings:
            log.warning("%s", warning)
        summary = {
            "warnings": warnings,
            "updates": result.updates, "resumed_from": result.resumed_from,
            "reward_first": first["reward_mean"], "reward_last": last["reward_mean"],
            "kl_last": last["kl"], "seconds": round(time.perf_counter() - started, 1),
            "algorithm": settings.algorithm, "candidate": candidate.label,
            "settings": settings.model_dump(mode="json"),
            "reward_model": cfg.step_uri("reward", "model"),
            "base_model": cfg.model.base_model, "base_model_revision": cfg.model.revision,
            "init_from": cfg.rl_start,
            "init_model": (cfg.step_uri("sft", "model") if cfg.rl_start == "sft"
                           else cfg.model.base_model),
            "normalisation": norm,
            "lora_rank": cfg.ppo.lora_rank, "prompt_format": renderer.settings(),
            "mlflow_run_id": run_id,
        }
        training.save_tuned_policy(
            cfg, storage, candidate.folder, stack.policy, tokenizer, renderer, tmp,
            lora_rank=cfg.ppo.lora_rank, merge=cfg.ppo.merge_adapter,
            files={"ppo_summary.json": json.dumps(summary, indent=2),
                   "history.json": json.dumps(result.history)})
        _log_curves(result.history, tmp / "curves.png")
        tracking.log_metrics("ppo", {"reward_lift": last["reward_mean"] - first["reward_mean"],
                                     "seconds": summary["seconds"]})
    return {"model_uri": join(out_uri, "model"), "served_uri": join(out_uri, "served"),
            "updates": result.updates,
            "resumed_from": result.resumed_from,
            "reward_first": round(first["reward_mean"], 4),
            "reward_last": round(last["reward_mean"], 4), "kl_last": round(last["kl"], 4),
            "weights_sha256": digest, "processes": world, "warnings": warnings,
            "mlflow_run_id": run_id}


def _log_curves(history: list[dict], path: Path) -> None:
    """Reward and KL per update as a PNG in the step's MLflow run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    steps = [h["update"] for h in history]
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.2))
    for ax, key, title in zip(axes, ("reward_mean", "kl", "entropy", "response_length",
                                     "policy_clipfrac"),
                              ("normalised reward", "KL to reference", "entropy",
                               "response length", "clip fraction")):
        ax.plot(steps, [h[key] for h in history], marker=".")
        ax.set_title(title)
        ax.set_xlabel("PPO update")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    mlflow.log_artifact(str(path), artifact_path="ppo")
