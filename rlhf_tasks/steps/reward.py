"""The ``reward`` step: TRL RewardTrainer (Bradley-Terry loss) with LoRA on the preferences.

Inputs: ``validate_preference/canonical.parquet`` (ranked lists already expanded to pairs)
and ``validate_prompt/canonical.parquet`` (prompts for the normalisation samples).
Outputs under ``<run>/reward/``: ``model/`` (adapter or full weights in safetensors, the
tokenizer, ``reward_model.json`` with the normalisation statistics, ``prompt_format.json``),
``served/`` (an MLflow pyfunc model returning scores, what the registry holds),
``checkpoints/``.

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
from rlhf_tasks.reward_model import INFO, pairwise_accuracy, reward_tokenizer, score_sequences
from rlhf_tasks.storage import Storage, join

log = logging.getLogger(__name__)
BASE_LR_LORA, BASE_LR_FULL = 1e-3, 2e-5


def _encode_pairs(frame, renderer, use_margin: bool) -> dict[str, list]:
    """Full sequences, prompt + response, as TRL's RewardTrainer reads them."""
    pairs = training.encode_pairs(renderer, frame)
    out: dict[str, list] = {
        side: [p + r for p, r in zip(pairs["prompt_ids"], pairs[side])]
        for side in ("chosen_ids", "rejected_ids")}
    if use_margin:
        out["margin"] = [0.0 if m is None or math.isnan(m) else float(m) for m in frame["margin"]]
    return out


def sample_reference(policy, prompts: list[list[int]], tokenizer, renderer, cfg, device: str,
                     batch_size: int = 64) -> list[list[int]]:
    """Full sequences (prompt + response, truncated after the stop token) sampled from
    ``policy`` with the decoding PPO uses for its rollouts."""
    import torch

    from rlhf_tasks.generation import collate_prompts
    from rlhf_tasks.rl import core
    from rlhf_tasks.progress import Progress
    from rlhf_tasks.rl.rollout import rollout
    from rlhf_tasks.rl.settings import rl_settings

    settings = rl_settings(cfg)
    sequences = []
    meter = Progress(len(prompts), "reward normalisation: reference samples", unit="prompts")
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start: start + batch_size]
        ids, mask = collate_prompts(chunk, tokenizer.pad_token_id, device)
        with training.autocast(cfg, device):
            responses, _ = rollout(policy, ids, mask, settings, renderer.stop_ids,
                                   tokenizer.pad_token_id)
        keep, _ = core.response_mask(responses, renderer.stop_ids)
        for prompt, response, n in zip(chunk, responses.tolist(), keep.sum(1).tolist()):
            sequences.append(prompt + response[:n])
        del responses
        meter.update(len(chunk))
    meter.close()
    if device == "cuda":
        torch.cuda.empty_cache()
    return sequences


def score_moments(policy, scorer, prompt_frame, tokenizer, renderer, cfg, device: str) -> dict:
    """Mean and std of ``scorer``'s raw scores on ``policy``'s answers to
    ``reward.norm_samples`` seeded picks of the prompts, sampled as PPO samples: the
    normalisation that starts PPO's rewards near mean 0, std 1 for that policy."""
    import torch

    picks = torch.randperm(len(prompt_frame),
                           generator=torch.Generator().manual_seed(cfg.run.seed))
    picks = picks[: cfg.reward.norm_samples].tolist()
    encoded = training.encode_prompts(renderer, prompt_frame.iloc[picks])
    torch.manual_seed(cfg.run.seed)
    sequences = sample_reference(policy, encoded, tokenizer, renderer, cfg, device)
    with training.autocast(cfg, device):
        scores = torch.tensor(score_sequences(scorer, sequences, tokenizer.pad_token_id,
                                              device=device))
    return {"mean": scores.mean().item(), "std": max(scores.std().item(), 1e-6),
            "samples": len(sequences), "temperature": cfg.ppo.temperature}


def reward(cfg) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    rc = cfg.reward
    storage = Storage.from_config(cfg)
    out_uri = cfg.step_uri("reward")
    checkpoints_uri = join(out_uri, "checkpoints")
    key = training.resume_key(cfg, storage, "reward", ("validate_preference",))
    device = training.resolve_device(cfg)
    torch.manual_seed(cfg.run.seed)
    with tracking.step_run(cfg, "reward", tags={"reward.lora_rank": str(rc.lora_rank),
                                                **training.precision_tag(cfg)},
                           system_metrics=True) as run_id, \
            tempfile.TemporaryDirectory(prefix="rlhf-reward-") as tmp:
        started = time.perf_counter()
        described = training.log_model_reference(cfg, storage)
        tokenizer = models.load_tokenizer(cfg, storage)
        renderer = models.renderer(cfg, tokenizer, storage)
        pairs = training.read_canonical(cfg, storage, "preference", mlflow_context="training")
        train_df, eval_df = training.split_by_prompt(pairs, rc.eval_fraction, cfg.run.seed)
        if train_df.empty:
            raise BadInput("no preference pairs left to train on after the held-out split",
                           field="reward.eval_fraction")
        train_set = Dataset.from_dict(_encode_pairs(train_df, renderer, rc.use_margin))
        held_out = _encode_pairs(eval_df, renderer, False)

        base_dir = models.base_model_dir(cfg, storage)
        models.require_safetensors(base_dir)
        model = AutoModelForSequenceClassification.from_pretrained(
            base_dir, num_labels=1, use_safetensors=True,
            trust_remote_code=cfg.model.trust_remote_code,
            **models.load_kwargs(cfg, device, trainable=rc.lora_rank == 0))
        # the classifier pools at the last token that is not its pad: pad with an id that
        # ends no response, so it is trained to score the stop token (reward_model.py)
        scorer_tokenizer = reward_tokenizer(tokenizer, renderer.stop_ids)
        model.config.pad_token_id = scorer_tokenizer.pad_token_id
        model = training.trainable_model(model, rc, "SEQ_CLS", ["score"])
        lr = training.learning_rate(BASE_LR_LORA, BASE_LR_FULL, rc.lora_rank,
                                    rc.learning_rate_multiplier)
        args = RewardConfig(**training.trainer_common_args(
            cfg, output_dir=Path(tmp) / "trainer", steps=rc.train_steps,
            batch_size=rc.batch_size, learning_rate=lr, checkpoint_every=rc.checkpoint_every),
            center_rewards_coefficient=rc.center_rewards_coefficient, disable_dropout=True,
            max_length=None)
        trainer = RewardTrainer(
            model=model, args=args, train_dataset=train_set, processing_class=scorer_tokenizer,
            callbacks=training.trainer_callbacks("reward", storage, checkpoints_uri, key))
        resume = training.fetch_latest_checkpoint(storage, checkpoints_uri, Path(tmp) / "trainer",
                                                  key)
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        trained = trainer.model.to(device).eval()

        with training.autocast(cfg, device):
            accuracy = pairwise_accuracy(trained, held_out["chosen_ids"],
                                         held_out["rejected_ids"], tokenizer.pad_token_id,
                                         device=device)
        log.info("held-out pairwise accuracy %.3f on %d pairs", accuracy["accuracy"],
                 accuracy["pairs"])
        scores_by_side = {"chosen": accuracy.pop("chosen_scores"),
                          "rejected": accuracy.pop("rejected_scores")}
        tracking.log_histograms(scores_by_side, "reward/heldout_scores.png",
                                title="Reward scores on held-out pairs",
                                xlabel="reward score (before normalisation)")

        # normalisation statistics on reference-policy samples
        prompt_frame = training.read_canonical(cfg, storage, "prompt", mlflow_context="scoring")
        policy = models.load_causal_lm(cfg, storage, **models.load_kwargs(
            cfg, device, trainable=False)).to(device).eval()
        norm = score_moments(policy, trained, prompt_frame, tokenizer, renderer, cfg, device)
        del policy

        model_dir = Path(tmp) / "model"
        trained.save_pretrained(model_dir, safe_serialization=True)
        scorer_tokenizer.save_pretrained(model_dir)
        renderer.save(model_dir)
        info = {"kind": "lora" if rc.lora_rank else "full", "base_model": cfg.model.base_model,
                "base_model_revision": described["model.resolved_revision"],
                "base_model_sha256": described["model.weights_sha256"],
                "lora_rank": rc.lora_rank, "pad_token_id": scorer_tokenizer.pad_token_id,
                "normalisation": norm, "heldout": accuracy, "train_pairs": len(train_df),
                "prompt_format": renderer.settings(), "mlflow_run_id": run_id}
        (model_dir / INFO).write_text(json.dumps(info, indent=2))
        model_uri = join(out_uri, "model")
        storage.put_dir(model_dir, model_uri, extra={"step": "reward", "kind": info["kind"]})

        # the MLflow model the registry serves: merged weights, tokenizer, prompt format
        from rlhf_tasks import serving

        merged = trained.merge_and_unload() if rc.lora_rank else trained
        served_dir = serving.save_reward_model(Path(tmp) / "served", merged.cpu(),
                                               scorer_tokenizer, renderer, norm)
        storage.put_dir(served_dir, join(out_uri, "served"), extra={"step": "reward"})

        tracking.log_metrics("reward", {
            "heldout/accuracy": accuracy["accuracy"], "heldout/margin": accuracy["margin"],
            "heldout/pairs": accuracy["pairs"], "norm/mean": norm["mean"],
            "norm/std": norm["std"], "train_pairs": len(train_df),
            "seconds": time.perf_counter() - started})
        import mlflow

        mlflow.log_dict(info, "reward/reward_model.json")
    return {"model_uri": model_uri, "served_uri": join(out_uri, "served"),
            "resumed_from": training.checkpoint_step(resume),
            "heldout_accuracy": round(accuracy["accuracy"], 4),
            "heldout_pairs": accuracy["pairs"], "norm_mean": round(norm["mean"], 4),
            "norm_std": round(norm["std"], 4), "mlflow_run_id": run_id}

