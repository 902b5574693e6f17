"""The ``dpo`` step: tune the policy on the preference pairs directly (TRL's DPOTrainer,
LoRA), with no reward model and no RL loop.

Inputs: ``validate_preference/canonical.parquet`` and, when the run trains one,
``sft/model/``.  It starts where RL starts (``ppo.init_from``; by default the SFT policy
when the run trains SFT, merged into the base weights), and that starting policy is the
reference: with LoRA, TRL reads it with the adapter disabled.  Pairs are in the project's
token layout (the prompt renderer's prompt ids, each response's ids ending with the stop
token), the layout every other step reads and the served model writes, not re-tokenized
from text by TRL.  ``dpo.loss_type: ipo`` trains IPO instead.
Outputs under ``<run>/dpo/`` (also in a bake-off): ``model/`` (the adapter or full
weights, the tokenizer, ``prompt_format.json``, ``dpo_summary.json``; ``merged/`` when it started from SFT),
``served/`` (the MLflow model), ``checkpoints/`` (a rerun resumes from the newest).
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path

from rlhf_tasks import models, tracking, training
from rlhf_tasks.storage import Storage, join

BASE_LR_LORA, BASE_LR_FULL = 5e-5, 5e-7


def dpo(cfg) -> dict:
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from rlhf_tasks.steps.ppo import starting_policy

    class TokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer on pairs already tokenized in the project's layout (TRL 1.16
        tokenizes text only; its collator reads these three columns)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    candidate = cfg.candidate_for("dpo")
    dc = cfg.dpo
    storage = Storage.from_config(cfg)
    out_uri = cfg.step_uri(candidate.folder)
    checkpoints_uri = join(out_uri, "checkpoints")
    inputs = ("validate_preference",) + (("sft/model",) if cfg.rl_start == "sft" else ())
    key = training.resume_key(cfg, storage, "dpo", inputs)
    device = training.resolve_device(cfg)
    torch.manual_seed(cfg.run.seed)
    with tracking.step_run(cfg, "dpo", name=candidate.folder,
                           tags={"dpo.lora_rank": str(dc.lora_rank),
                                 "rlhf.candidate": candidate.label,
                                 "dpo.loss_type": dc.loss_type,
                                 "dpo.init_from": cfg.rl_start,
                                 **training.precision_tag(cfg)},
                           system_metrics=True) as run_id, \
            tempfile.TemporaryDirectory(prefix="rlhf-dpo-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        training.log_model_reference(cfg, storage)
        tokenizer = models.load_tokenizer(cfg, storage)
        renderer = models.renderer(cfg, tokenizer, storage)
        frame = training.read_canonical(cfg, storage, "preference", mlflow_context="training")
        pairs = training.encode_pairs(renderer, frame)
        policy = starting_policy(cfg, storage, tmp / "sft", **models.load_kwargs(
            cfg, device, trainable=dc.lora_rank == 0))
        # full tuning keeps a frozen copy of the starting policy as the reference (in the
        # compute dtype, as frozen weights load); with LoRA the reference is the same
        # weights with the adapter disabled
        reference = None
        if dc.lora_rank == 0:
            reference = copy.deepcopy(policy).to(models.compute_dtype(cfg, device))
            reference.requires_grad_(False).eval()
        model = training.trainable_model(policy, dc, "CAUSAL_LM")
        lr = training.learning_rate(BASE_LR_LORA, BASE_LR_FULL, dc.lora_rank,
                                    dc.learning_rate_multiplier)
        args = DPOConfig(**training.trainer_common_args(
            cfg, output_dir=tmp / "trainer", steps=dc.train_steps, batch_size=dc.batch_size,
            learning_rate=lr, checkpoint_every=dc.checkpoint_every),
            beta=dc.beta, loss_type=[dc.loss_type], max_length=None, disable_dropout=True)
        trainer = TokenizedDPOTrainer(
            model=model, ref_model=reference, args=args,
            train_dataset=Dataset.from_dict(pairs), processing_class=tokenizer,
            callbacks=training.trainer_callbacks("dpo", storage, checkpoints_uri, key))
        resume = training.fetch_latest_checkpoint(storage, checkpoints_uri, tmp / "trainer", key)
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)

        summary = {"algorithm": "dpo", "candidate": candidate.label,
                   "kind": "lora" if dc.lora_rank else "full",
                   "loss_type": dc.loss_type, "beta": dc.beta,
                   "base_model": cfg.model.base_model, "init_from": cfg.rl_start,
                   "init_model": (cfg.step_uri("sft", "model") if cfg.rl_start == "sft"
                                  else cfg.model.base_model),
                   "data": ("SFT + " if cfg.rl_start == "sft" else "")
                   + f"{len(frame):,} preference pairs",
                   "lora_rank": dc.lora_rank, "train_pairs": len(frame),
                   "train_loss": output.training_loss, "steps": output.global_step,
                   "prompt_format": renderer.settings(), "mlflow_run_id": run_id}
        model_uri, served_uri = training.save_tuned_policy(
            cfg, storage, candidate.folder, trainer.model, tokenizer, renderer, tmp,
            lora_rank=dc.lora_rank, files={"dpo_summary.json": json.dumps(summary, indent=2)})
        tracking.log_metrics("dpo", {"train_pairs": len(frame),
                                     "final_loss": output.training_loss,
                                     "seconds": time.perf_counter() - started})
    return {"model_uri": model_uri, "served_uri": served_uri,
            "resumed_from": training.checkpoint_step(resume), "train_pairs": len(frame),
            "train_loss": round(output.training_loss, 4), "steps": output.global_step,
            "mlflow_run_id": run_id}
