"""The ``evaluate`` step: every model under comparison answers the eval prompts, with the
same decoding settings; automatic metrics per model; a blinded review batch for the panel.

Models: the candidate (``<run>/ppo/model``), the registry's ``champion`` (when there is
one) and the baselines of ``evaluation.baselines`` (``foundation``: the base model;
``sft``: ``<run>/sft/model`` when the SFT step ran).  Outputs under ``<run>/evaluate/``:
``responses.jsonl`` (server side: it names the model of every response),
``evaluate.json`` (decoding settings, metrics, the batch id).  The review batch goes into
the verdict store, shuffled, the model kept there on the server side only.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from rlhf_tasks import models, registry, tracking, training
from rlhf_tasks.storage import Storage, join

log = logging.getLogger(__name__)
CANDIDATE = "rlhf"


def models_under_comparison(cfg, storage: Storage):
    """label -> model folder URI (or the base model), in table order; and the champion's
    ModelVersion (None when there is none)."""
    out: dict[str, str] = {}
    if "foundation" in cfg.evaluation.baselines:
        out["foundation"] = cfg.model.base_model
    sft_uri = cfg.step_uri("sft", "model")
    if "sft" in cfg.evaluation.baselines and storage.is_complete(sft_uri):
        out["sft"] = sft_uri
    champ = registry.champion(cfg)
    if champ is not None:
        out["champion"] = champ.source
    out[CANDIDATE] = cfg.step_uri("ppo", "model")
    return out, champ


def load_policy(cfg, storage: Storage, uri: str, local: Path):
    """A causal LM from a base checkpoint, a merged folder, or a LoRA adapter folder."""
    if uri == cfg.model.base_model:
        return models.load_causal_lm(cfg, storage)
    folder = storage.get_dir(uri, local)
    if (folder / "merged").is_dir():
        return models.load_causal_lm(cfg, storage, path=str(folder / "merged"))
    if (folder / "adapter_config.json").exists():
        from peft import PeftModel

        summary = next((json.loads(p.read_text()) for p in
                        (folder / "ppo_summary.json", folder / "sft_summary.json") if p.exists()),
                       {})
        base = models.load_causal_lm(cfg, storage, path=summary.get("base_model"))
        return PeftModel.from_pretrained(base, folder).merge_and_unload()
    return models.load_causal_lm(cfg, storage, path=str(folder))


def generate(model, tokenizer, prompts: list[list[int]], *, temperature: float,
             max_new_tokens: int, seed: int, device: str, batch_size: int = 64):
    """Responses (token ids up to the first EOS, which is dropped) and whether each ended."""
    import torch

    from rlhf_tasks.ppo.trainer import collate_prompts

    torch.manual_seed(seed)
    model.eval().to(device)
    out, ended = [], []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            ids, mask = collate_prompts(prompts[start:start + batch_size],
                                        tokenizer.pad_token_id, device)
            gen = model.generate(input_ids=ids, attention_mask=mask,
                                 do_sample=temperature > 0, temperature=temperature or None,
                                 top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            for row in gen[:, ids.shape[1]:].tolist():
                eos = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else None
                out.append(row[:eos] if eos is not None else row)
                ended.append(eos is not None)
    return out, ended


def evaluate(cfg) -> dict:
    from rlhf_tasks.panel.store import PanelStore, panel_store_url
    from rlhf_tasks.reward_model import load_reward_model, score_sequences

    ev = cfg.evaluation
    storage = Storage.from_config(cfg)
    device = training.resolve_device(cfg)
    out_uri = cfg.step_uri("evaluate")
    decoding = {"temperature": ev.temperature, "max_new_tokens": ev.max_new_tokens,
                "top_k": 0, "top_p": 1.0, "seed": cfg.run.seed}
    with tracking.step_run(cfg, "evaluate") as run_id, \
            tempfile.TemporaryDirectory(prefix="rlhf-evaluate-") as tmp:
        tmp = Path(tmp)
        import mlflow

        mlflow.log_params({f"decoding.{k}": v for k, v in decoding.items()})
        tokenizer = models.load_tokenizer(cfg, storage)
        prompts = list(training.read_canonical(cfg, storage, "eval")["prompt"])
        if ev.max_prompts:
            prompts = prompts[:ev.max_prompts]
        encoded = [training.encode_prompt(tokenizer, p, cfg.model.instruction) for p in prompts]
        base_dir = models.local_model_dir(cfg.model.base_model, storage)
        reward_model, info = load_reward_model(
            storage.get_dir(cfg.step_uri("reward", "model"), tmp / "reward"),
            base_model_dir=base_dir, trust_remote_code=cfg.model.trust_remote_code)
        norm = info["normalisation"]
        reward_model.to(device)

        compared, champion = models_under_comparison(cfg, storage)
        rows, metrics = [], {}
        for label, uri in compared.items():
            log.info("evaluate: %s (%s) answers %d prompts", label, uri, len(prompts))
            policy = load_policy(cfg, storage, uri, tmp / label)
            responses, ended = generate(policy, tokenizer, encoded, device=device,
                                        temperature=ev.temperature,
                                        max_new_tokens=ev.max_new_tokens, seed=cfg.run.seed)
            del policy
            scores = score_sequences(reward_model, [p + r + [tokenizer.eos_token_id]
                                                    for p, r in zip(encoded, responses)],
                                     tokenizer.pad_token_id, device=device)
            scores = [(s - norm["mean"]) / norm["std"] for s in scores]
            texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
            metrics[label] = {"reward_mean": sum(scores) / len(scores),
                              "length_mean": sum(map(len, responses)) / len(responses),
                              "missing_eos_rate": 1 - sum(ended) / len(ended),
                              "empty_rate": sum(not t for t in texts) / len(texts)}
            tracking.log_metrics("eval", {f"{label}/{k}": v for k, v in metrics[label].items()})
            rows += [{"prompt_index": i, "prompt": p, "response": t, "model": label,
                      "reward": round(s, 4), "ended": e}
                     for i, (p, t, s, e) in enumerate(zip(prompts, texts, scores, ended))]

        store = PanelStore(panel_store_url(cfg))
        batch_id = store.create_batch(
            pipeline=cfg.run.pipeline, run_id=cfg.run.run_id, items=rows,
            verdicts_per_item=cfg.panel.verdicts_per_item, quality_bar=cfg.panel.quality_bar,
            simulated=cfg.panel.mode == "simulated", seed=cfg.run.seed)
        store.dispose()
        local = tmp / "out"
        local.mkdir()
        with open(local / "responses.jsonl", "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        summary = {"models": compared, "decoding": decoding, "metrics": metrics,
                   "champion_version": str(champion.version) if champion else None,
                   "prompts": len(prompts), "batch_id": batch_id, "mlflow_run_id": run_id}
        (local / "evaluate.json").write_text(json.dumps(summary, indent=2))
        storage.put_dir(local, out_uri, extra={"step": "evaluate"})
        mlflow.set_tag("panel.batch_id", batch_id)
    return {"batch_id": batch_id, "models": list(compared), "prompts": len(prompts),
            "items": len(rows), "summary_uri": join(out_uri, "evaluate.json"),
            "metrics": {m: {k: round(v, 4) for k, v in d.items()} for m, d in metrics.items()},
            "mlflow_run_id": run_id}
