"""The ``reward`` step: TRL RewardTrainer (Bradley-Terry loss) with LoRA on the preferences.

Inputs: ``validate_preference/canonical.parquet`` (ranked lists already expanded to pairs)
and ``validate_prompt/canonical.parquet`` (prompts for the normalisation samples).
Outputs under ``<run>/reward/``: ``model/`` (adapter or full weights in safetensors, the
tokenizer, ``reward_model.json`` with the normalisation statistics), ``checkpoints/``.

The held-out split is by prompt, so no prompt is both trained on and scored.  After
training, the reference policy (the base model) answers ``norm_samples`` prompts the way
PPO will sample them, and the mean and std of their scores are stored with the model:
PPO subtracts and divides by them so that its rewards start near mean 0 and std 1.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path

from rlhf_tasks import models, tracking, training
from rlhf_tasks.errors import BadInput
from rlhf_tasks.reward_model import INFO, pairwise_accuracy, score_sequences
from rlhf_tasks.storage import Storage, join

log = logging.getLogger(__name__)
BASE_LR_LORA, BASE_LR_FULL = 1e-3, 2e-5


def _encode_pairs(frame, tokenizer, instruction: str, use_margin: bool) -> dict[str, list]:
    out: dict[str, list] = {"chosen_ids": [], "rejected_ids": []}
    for row in frame.itertuples(index=False):
        prompt = training.encode_prompt(tokenizer, row.prompt, instruction)
        out["chosen_ids"].append(prompt + training.encode_response(tokenizer, row.chosen))
        out["rejected_ids"].append(prompt + training.encode_response(tokenizer, row.rejected))
    if use_margin:
        out["margin"] = [0.0 if m is None or math.isnan(m) else float(m) for m in frame["margin"]]
    return out


def sample_reference(policy, prompts: list[list[int]], tokenizer, cfg, device: str,
                     batch_size: int = 64) -> list[list[int]]:
    """Full sequences (prompt + response, truncated at EOS) sampled from ``policy`` with the
    decoding PPO uses for its rollouts."""
    import torch

    from rlhf_tasks.ppo import core
    from rlhf_tasks.ppo.trainer import collate_prompts, rollout
    from rlhf_tasks.steps.ppo import ppo_settings

    settings = ppo_settings(cfg)
    sequences = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start: start + batch_size]
        ids, mask = collate_prompts(chunk, tokenizer.pad_token_id, device)
        responses, _ = rollout(policy, ids, mask, settings, tokenizer.eos_token_id,
                               tokenizer.pad_token_id)
        keep, _ = core.response_mask(responses, tokenizer.eos_token_id)
        for prompt, response, n in zip(chunk, responses.tolist(), keep.sum(1).tolist()):
            sequences.append(prompt + response[:n])
        del responses
    if device == "cuda":
        torch.cuda.empty_cache()
    return sequences


def reward(cfg) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from rlhf_tasks.ppo.models import lora_config

    rc = cfg.reward
    storage = Storage.from_config(cfg)
    out_uri = cfg.step_uri("reward")
    checkpoints_uri = join(out_uri, "checkpoints")
    device = training.resolve_device(cfg)
    torch.manual_seed(cfg.run.seed)
    with tracking.step_run(cfg, "reward", tags={"reward.lora_rank": str(rc.lora_rank)}) as run_id, \
            tempfile.TemporaryDirectory(prefix="rlhf-reward-") as tmp:
        started = time.perf_counter()
        tokenizer = models.load_tokenizer(cfg, storage)
        pairs = training.read_canonical(cfg, storage, "preference")
        train_df, eval_df = training.split_by_prompt(pairs, rc.eval_fraction, cfg.run.seed)
        if train_df.empty:
            raise BadInput("no preference pairs left to train on after the held-out split",
                           field="reward.eval_fraction")
        instruction = cfg.model.instruction
        train_set = Dataset.from_dict(_encode_pairs(train_df, tokenizer, instruction, rc.use_margin))
        held_out = _encode_pairs(eval_df, tokenizer, instruction, False)

        base_dir = models.local_model_dir(cfg.model.base_model, storage)
        models.require_safetensors(base_dir)
        model = AutoModelForSequenceClassification.from_pretrained(
            base_dir, num_labels=1, use_safetensors=True,
            trust_remote_code=cfg.model.trust_remote_code)
        model.config.pad_token_id = tokenizer.pad_token_id
        lr = training.learning_rate(BASE_LR_LORA, BASE_LR_FULL, rc.lora_rank,
                                    rc.learning_rate_multiplier)
        args = RewardConfig(**training.trainer_common_args(
            cfg, output_dir=Path(tmp) / "trainer", steps=rc.train_steps,
            batch_size=rc.batch_size, learning_rate=lr, checkpoint_every=rc.checkpoint_every),
            center_rewards_coefficient=rc.center_rewards_coefficient, disable_dropout=True,
            max_length=None)
        trainer = RewardTrainer(
            model=model, args=args, train_dataset=train_set, processing_class=tokenizer,
            peft_config=lora_config(rc.lora_rank, "SEQ_CLS", ["score"]) if rc.lora_rank else None,
            callbacks=training.trainer_callbacks("reward", storage, checkpoints_uri))
        resume = training.fetch_latest_checkpoint(storage, checkpoints_uri, Path(tmp) / "trainer")
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        trained = trainer.model.to(device).eval()

        accuracy = pairwise_accuracy(trained, held_out["chosen_ids"], held_out["rejected_ids"],
                                     tokenizer.pad_token_id, device=device)
        log.info("held-out pairwise accuracy %.3f on %d pairs", accuracy["accuracy"],
                 accuracy["pairs"])

        # normalisation statistics on reference-policy samples
        prompts = training.read_canonical(cfg, storage, "prompt")["prompt"].tolist()
        picks = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.run.seed))
        picks = picks[: rc.norm_samples].tolist()
        encoded = [training.encode_prompt(tokenizer, prompts[i], instruction) for i in picks]
        policy = models.load_causal_lm(cfg, storage).to(device).eval()
        sequences = sample_reference(policy, encoded, tokenizer, cfg, device)
        del policy
        scores = torch.tensor(score_sequences(trained, sequences, tokenizer.pad_token_id,
                                              device=device))
        norm = {"mean": scores.mean().item(), "std": max(scores.std().item(), 1e-6),
                "samples": len(sequences), "temperature": cfg.ppo.temperature}

        model_dir = Path(tmp) / "model"
        trained.save_pretrained(model_dir, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)
        info = {"kind": "lora" if rc.lora_rank else "full", "base_model": cfg.model.base_model,
                "lora_rank": rc.lora_rank, "pad_token_id": tokenizer.pad_token_id,
                "normalisation": norm, "heldout": accuracy, "train_pairs": len(train_df),
                "instruction": instruction, "mlflow_run_id": run_id}
        (model_dir / INFO).write_text(json.dumps(info, indent=2))
        model_uri = join(out_uri, "model")
        storage.put_dir(model_dir, model_uri, extra={"step": "reward", "kind": info["kind"]})

        tracking.log_metrics("reward", {
            "heldout/accuracy": accuracy["accuracy"], "heldout/margin": accuracy["margin"],
            "heldout/pairs": accuracy["pairs"], "norm/mean": norm["mean"],
            "norm/std": norm["std"], "train_pairs": len(train_df),
            "seconds": time.perf_counter() - started})
        import mlflow

        mlflow.log_dict(info, "reward/reward_model.json")
    return {"model_uri": model_uri, "resumed_from": training.checkpoint_step(resume),
            "heldout_accuracy": round(accuracy["accuracy"], 4),
            "heldout_pairs": accuracy["pairs"], "norm_mean": round(norm["mean"], 4),
            "norm_std": round(norm["std"], 4), "mlflow_run_id": run_id}

