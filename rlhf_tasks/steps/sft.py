"""The ``sft`` step: the supervised baseline (TRL SFTTrainer with LoRA) on reference answers.

Input: ``validate_sft/canonical.parquet`` (prompt + reference completion).  The loss is on
the completion tokens only; sequences use the same token layout as every other step.
Outputs under ``<run>/sft/``: ``model/`` (adapter or full weights in safetensors, the
tokenizer, ``sft_summary.json``), ``checkpoints/``.  The baseline is the middle row of
the case study's table (foundation / SFT / RLHF); PPO starts from the base model.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from rlhf_tasks import models, tracking, training
from rlhf_tasks.storage import Storage, join

BASE_LR_LORA, BASE_LR_FULL = 1e-3, 2e-5


def sft(cfg) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    sc = cfg.sft
    storage = Storage.from_config(cfg)
    out_uri = cfg.step_uri("sft")
    checkpoints_uri = join(out_uri, "checkpoints")
    key = training.resume_key(cfg, storage, "sft", ("validate_sft",))
    torch.manual_seed(cfg.run.seed)
    with tracking.step_run(cfg, "sft", tags={"sft.lora_rank": str(sc.lora_rank),
                                             **training.precision_tag(cfg)},
                           system_metrics=True) as run_id, \
            tempfile.TemporaryDirectory(prefix="rlhf-sft-") as tmp:
        started = time.perf_counter()
        training.log_model_reference(cfg, storage)
        tokenizer = models.load_tokenizer(cfg, storage)
        renderer = models.renderer(cfg, tokenizer, storage)
        frame = training.read_canonical(cfg, storage, "sft", mlflow_context="training")
        rows: dict[str, list] = {"input_ids": [], "completion_mask": []}
        for prompt, text in zip(training.encode_prompts(renderer, frame), frame["completion"]):
            completion = renderer.response_ids(text)
            rows["input_ids"].append(prompt + completion)
            rows["completion_mask"].append([0] * len(prompt) + [1] * len(completion))
        device = training.resolve_device(cfg)
        model = models.load_causal_lm(cfg, storage, **models.load_kwargs(
            cfg, device, trainable=sc.lora_rank == 0))
        model = training.trainable_model(model, sc, "CAUSAL_LM")
        lr = training.learning_rate(BASE_LR_LORA, BASE_LR_FULL, sc.lora_rank,
                                    sc.learning_rate_multiplier)
        args = SFTConfig(**training.trainer_common_args(
            cfg, output_dir=Path(tmp) / "trainer", steps=sc.train_steps, batch_size=sc.batch_size,
            learning_rate=lr, checkpoint_every=sc.checkpoint_every),
            completion_only_loss=True, max_length=None, packing=False)
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=Dataset.from_dict(rows),
            processing_class=tokenizer,
            callbacks=training.trainer_callbacks("sft", storage, checkpoints_uri, key))
        resume = training.fetch_latest_checkpoint(storage, checkpoints_uri, Path(tmp) / "trainer",
                                                  key)
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)

        model_dir = Path(tmp) / "model"
        trainer.model.save_pretrained(model_dir, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)
        renderer.save(model_dir)
        summary = {"kind": "lora" if sc.lora_rank else "full", "base_model": cfg.model.base_model,
                   "lora_rank": sc.lora_rank, "train_rows": len(frame),
                   "train_loss": output.training_loss, "steps": output.global_step,
                   "prompt_format": renderer.settings(), "mlflow_run_id": run_id}
        (model_dir / "sft_summary.json").write_text(json.dumps(summary, indent=2))
        model_uri = join(out_uri, "model")
        storage.put_dir(model_dir, model_uri, extra={"step": "sft", "kind": summary["kind"]})
        tracking.log_metrics("sft", {"train_rows": len(frame), "final_loss": output.training_loss,
                                     "seconds": time.perf_counter() - started})
    return {"model_uri": model_uri, "resumed_from": training.checkpoint_step(resume),
            "train_rows": len(frame),
            "train_loss": round(output.training_loss, 4), "mlflow_run_id": run_id}

