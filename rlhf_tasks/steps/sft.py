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

    from rlhf_tasks.ppo.models import lora_config

    sc = cfg.sft
    storage = Storage.from_config(cfg)
    out_uri = cfg.step_uri("sft")
    checkpoints_uri = join(out_uri, "checkpoints")
    torch.manual_seed(cfg.run.seed)
    with tracking.step_run(cfg, "sft", tags={"sft.lora_rank": str(sc.lora_rank)}) as run_id, \
            tempfile.TemporaryDirectory(prefix="rlhf-sft-") as tmp:
        started = time.perf_counter()
        tokenizer = models.load_tokenizer(cfg, storage)
        frame = training.read_canonical(cfg, storage, "sft")
        rows: dict[str, list] = {"input_ids": [], "completion_mask": []}
        for row in frame.itertuples(index=False):
            prompt = training.encode_prompt(tokenizer, row.prompt, cfg.model.instruction)
            completion = training.encode_response(tokenizer, row.completion)
            rows["input_ids"].append(prompt + completion)
            rows["completion_mask"].append([0] * len(prompt) + [1] * len(completion))
        model = models.load_causal_lm(cfg, storage)
        lr = training.learning_rate(BASE_LR_LORA, BASE_LR_FULL, sc.lora_rank,
                                    sc.learning_rate_multiplier)
        args = SFTConfig(**training.trainer_common_args(
            cfg, output_dir=Path(tmp) / "trainer", steps=sc.train_steps, batch_size=sc.batch_size,
            learning_rate=lr, checkpoint_every=sc.checkpoint_every),
            completion_only_loss=True, max_length=None, packing=False)
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=Dataset.from_dict(rows),
            processing_class=tokenizer,
            peft_config=lora_config(sc.lora_rank, "CAUSAL_LM") if sc.lora_rank else None,
            callbacks=training.trainer_callbacks("sft", storage, checkpoints_uri))
        resume = training.fetch_latest_checkpoint(storage, checkpoints_uri, Path(tmp) / "trainer")
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)

        model_dir = Path(tmp) / "model"
        trainer.model.save_pretrained(model_dir, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)
        summary = {"kind": "lora" if sc.lora_rank else "full", "base_model": cfg.model.base_model,
                   "lora_rank": sc.lora_rank, "train_rows": len(frame),
                   "train_loss": output.training_loss, "steps": output.global_step,
                   "instruction": cfg.model.instruction, "mlflow_run_id": run_id}
        (model_dir / "sft_summary.json").write_text(json.dumps(summary, indent=2))
        model_uri = join(out_uri, "model")
        storage.put_dir(model_dir, model_uri, extra={"step": "sft", "kind": summary["kind"]})
        tracking.log_metrics("sft", {"train_rows": len(frame), "final_loss": output.training_loss,
                                     "seconds": time.perf_counter() - started})
    return {"model_uri": model_uri, "resumed_from": training.checkpoint_step(resume),
            "train_rows": len(frame),
            "train_loss": round(output.training_loss, 4), "mlflow_run_id": run_id}

