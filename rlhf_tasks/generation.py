"""Decoding settings built from scratch, with every knob explicit.

A checkpoint's ``generation_config.json`` often sets repetition_penalty, top_k/top_p,
min_p, min_new_tokens ...; ``generate`` fills every knob a caller leaves unset from it.
Rollouts must sample exactly the distribution PPO's training forward computes
(logits / T), and evaluation must decode every model the same way, so both use
:func:`decoding_config` and run ``generate`` under :func:`checkpoint_defaults_off`.
"""

from __future__ import annotations

import contextlib


def decoding_config(*, max_new_tokens: int, temperature: float, stop_ids: list[int],
                    pad_token_id: int):
    """Plain sampling of logits / ``temperature`` (greedy at 0), nothing else."""
    from transformers import GenerationConfig

    sample = temperature > 0
    # sampling knobs only when sampling (greedy decoding warns about them otherwise)
    knobs = dict(temperature=temperature, top_k=0, top_p=1.0, typical_p=1.0, epsilon_cutoff=0.0,
                 eta_cutoff=0.0) if sample else {}
    return GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=sample, **knobs,
        repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
        num_beams=1, num_beam_groups=1, length_penalty=1.0, renormalize_logits=False,
        use_cache=True, eos_token_id=list(stop_ids), pad_token_id=pad_token_id)


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

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved
