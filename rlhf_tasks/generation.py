"""Decoding settings built from scratch, with every knob explicit.

A checkpoint's ``generation_config.json`` often sets repetition_penalty, top_k/top_p,
min_p, min_new_tokens ...; ``generate`` fills every knob a caller leaves unset from it.
Rollouts must sample exactly the distribution PPO's training forward computes
(logits / T), and evaluation must decode every model the same way, so both use
:func:`decoding_config` and run ``generate`` under :func:`checkpoint_defaults_off`;
evaluation and the served model share :func:`generate`.
"""

from __future__ import annotations

import contextlib


def decoding_config(*, max_new_tokens: int, temperature: float, stop_ids: list[int],
                    pad_token_id: int, cache_implementation: str | None = None):
    """Plain sampling of logits / ``temperature`` (greedy at 0), nothing else.
    ``cache_implementation="static"``: a preallocated KV cache, with which transformers
    compiles the model's forward on a GPU."""
    from transformers import GenerationConfig

    sample = temperature > 0
    # sampling knobs only when sampling (greedy decoding warns about them otherwise)
    knobs = dict(temperature=temperature, top_k=0, top_p=1.0, typical_p=1.0, epsilon_cutoff=0.0,
                 eta_cutoff=0.0) if sample else {}
    return GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=sample, **knobs,
        repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
        num_beams=1, num_beam_groups=1, length_penalty=1.0, renormalize_logits=False,
        use_cache=True, eos_token_id=list(stop_ids), pad_token_id=pad_token_id,
        **({"cache_implementation": cache_implementation} if cache_implementation else {}))


def describe(*, max_new_tokens: int, temperature: float, stop_ids: list[int], seed: int) -> dict:
    """The decoding settings as MLflow params / a served model's metadata."""
    return {"temperature": temperature, "max_new_tokens": max_new_tokens, "top_k": 0,
            "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0, "num_beams": 1,
            "stop_ids": ",".join(map(str, stop_ids)), "seed": seed}


@contextlib.contextmanager
def checkpoint_defaults_off(model):
    """Hide the checkpoint's generation_config while ``generate`` runs (it fills every
    knob the caller left unset, e.g. min_p or sequence_bias, from it)."""
    from transformers import GenerationConfig

    from rlhf_tasks.models import unwrap_peft

    inner = unwrap_peft(model)
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


def generate(model, tokenizer, renderer, prompts: list[list[int]], *, temperature: float,
             max_new_tokens: int, device: str, seed: int | None = None, batch_size: int = 16,
             progress: str | None = None):
    """Responses to token-id ``prompts`` (ids up to and including the first stop token)
    and whether each ended, decoded with explicit settings only; seeded when ``seed`` is
    given (evaluation), from the process's random state otherwise (serving).  With
    ``progress`` (a label), logs count, rate and ETA as it goes."""
    import torch

    from rlhf_tasks.progress import Progress

    if seed is not None:
        torch.manual_seed(seed)
    model.eval().to(device)
    config = decoding_config(max_new_tokens=max_new_tokens, temperature=temperature,
                             stop_ids=renderer.stop_ids, pad_token_id=tokenizer.pad_token_id)
    out, ended = [], []
    meter = Progress(len(prompts), progress, unit="prompts") if progress else None
    with torch.inference_mode(), checkpoint_defaults_off(model):
        for start in range(0, len(prompts), batch_size):
            ids, mask = collate_prompts(prompts[start:start + batch_size],
                                        tokenizer.pad_token_id, device)
            gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            for row in gen[:, ids.shape[1]:].tolist():
                kept, stopped = renderer.split_response(row)
                out.append(kept)
                ended.append(stopped)
            if meter is not None:
                meter.update(len(gen))
    if meter is not None:
        meter.close()
    return out, ended


def position_ids(mask):
    """[N+ "left padding"] position ids that skip the left padding (0 at the first real token)."""
    return (mask.cumsum(1) - 1).clamp_min(0)


def collate_prompts(prompts: list[list[int]], pad_token_id: int, device):
    """Token-id prompts left-padded into one batch: (ids, attention mask) on ``device``."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)
