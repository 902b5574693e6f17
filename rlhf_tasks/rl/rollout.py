"""Rollouts: which prompts an update samples, and the responses the policy samples to
them with the log-probs of the distribution it sampled from."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_tasks.generation import position_ids
from rlhf_tasks.rl import core
from rlhf_tasks.rl.forwards import autocast


def prompt_batch(prompts: list[list[int]], position: int, size: int, seed: int
                 ) -> list[list[int]]:
    """The next ``size`` prompts of a seeded order that reshuffles every pass over the data."""
    out = []
    n = len(prompts)
    while len(out) < size:
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = order[offset: offset + size - len(out)].tolist()
        out += [prompts[i] for i in take]
        position += len(take)
    return out


def sample_tokens(scores: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """[sampling] One token per row from softmax(``scores``), by inverse transform: a
    uniform draw per row located in the row's cumulative distribution (float64).  The same
    distribution as ``torch.multinomial``, which draws an exponential variate for every
    vocabulary entry of every row (most of a CPU rollout step at a 32k vocabulary).  A
    token of probability 0 is never drawn."""
    cdf = (scores - lse[:, None]).exp().double().cumsum(-1)
    draw = torch.rand(len(cdf), 1, dtype=torch.float64, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, draw, right=True).clamp_max_(cdf.shape[1] - 1)


class _SampledLogprobs:
    """A logits processor that samples the next token itself and records its log-prob.

    It divides the raw logits by T (the sampling distribution), draws the token with
    :func:`sample_tokens` and hands ``generate`` (greedy) a choice it cannot change:
    -inf everywhere but the drawn token.  The log-prob kept is the token's logit minus
    the row's logsumexp: no (batch, vocab) log-softmax is built, and no step's scores are
    kept (as ``output_scores`` would)."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        scores = scores.float() / self.temperature
        lse = torch.logsumexp(scores, dim=-1)
        tokens = sample_tokens(scores, lse)
        self.logprobs.append(scores.gather(-1, tokens).squeeze(-1) - lse)
        return torch.full_like(scores, float("-inf")).scatter_(-1, tokens, 0.0)

    def finish(self) -> torch.Tensor:
        return torch.stack(self.logprobs, 1)


def rollout(policy, query_ids, query_mask, settings, stop_ids, pad_token_id: int):
    """Sample responses with ``generate``; returns (responses, rollout log-probs).

    [N+ "left padding"]: prompts are left-padded so every response starts at the same
    column; ``generate`` derives position ids from the attention mask so padding does not
    shift positions, and uses the KV cache.  [N+ "sampling"]: plain sampling of logits / T
    (top-k 0, top-p 1, no penalties: the checkpoint's generation_config is ignored), done
    by the recorder, so the log-probs are those of the distribution sampled; ``generate``
    itself runs greedy over the recorder's choice.  Generation stops at any of
    ``stop_ids`` (every EOS of the model, the chat template's end of turn).
    """
    from transformers import LogitsProcessorList

    from rlhf_tasks.generation import checkpoint_defaults_off, decoding_config

    stop_ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
    recorder = _SampledLogprobs(settings.temperature)
    # greedy (temperature 0) here: the recorder samples from logits / T itself
    config = decoding_config(max_new_tokens=settings.response_length, temperature=0.0,
                             stop_ids=stop_ids, pad_token_id=pad_token_id,
                             cache_implementation=("static" if settings.rollout_cache ==
                                                   "static" else None))
    # no_grad, not inference_mode: FSDP2 keeps the buffers it gathers weights into, and
    # would find them inference tensors in the next training forward
    with torch.no_grad(), checkpoint_defaults_off(policy):
        sequences = policy.generate(input_ids=query_ids, attention_mask=query_mask,
                                    generation_config=config,
                                    logits_processor=LogitsProcessorList([recorder]))
        logprobs = recorder.finish()
    # clones are ordinary tensors again, usable in the training graph
    return sequences[:, query_ids.shape[1]:].clone(), logprobs.clone()


@dataclass
class Rollouts:
    """One update's episodes on this process: prompt + response token ids and masks."""

    ids: torch.Tensor            # (B, width_q + width): prompt (left-padded) + response
    full_mask: torch.Tensor
    positions: torch.Tensor
    responses: torch.Tensor      # (B, width), padded after the first stop token
    logprobs: torch.Tensor       # (B, width) log-probs the rollout sampled with
    mask: torch.Tensor           # (B, width) 1 up to and including the stop token
    has_eos: torch.Tensor        # (B,) the response ended
    lengths: torch.Tensor        # (B,) response tokens kept
    width_q: int

    @property
    def maskf(self) -> torch.Tensor:
        return self.mask.float()


def collect_rollouts(unwrapped, query_ids, query_mask, s, stop_ids, pad_token_id: int,
                     device) -> Rollouts:
    """Sample one response per row of ``query_ids`` (a prompt sampled k times is k rows;
    policy and value model in eval mode until the update: dropout is off anyway).

    [N+ "Truncate at EOS"]: tokens after the first stop token are padding; a response
    that never stops keeps all its tokens (and is penalised in ``compute_advantages``)."""
    unwrapped.eval()
    with autocast(s, device):
        responses, logprobs = rollout(unwrapped.policy, query_ids, query_mask, s, stop_ids,
                                      pad_token_id)
    mask, has_eos = core.response_mask(responses, stop_ids)
    responses = responses.masked_fill(mask == 0, pad_token_id)
    full_mask = torch.cat([query_mask, mask], 1)
    return Rollouts(ids=torch.cat([query_ids, responses], 1), full_mask=full_mask,
                    positions=position_ids(full_mask), responses=responses,
                    logprobs=logprobs, mask=mask, has_eos=has_eos, lengths=mask.sum(1),
                    width_q=query_ids.shape[1])


def cut(batch: Rollouts, rows: torch.Tensor) -> tuple[int, tuple]:
    """[length buckets] ``rows`` cut to their longest response: (that width, the inputs)."""
    w = max(int(batch.lengths[rows].max()), 1)
    cols = batch.width_q + w
    return w, (batch.ids[rows, :cols], batch.full_mask[rows, :cols],
               batch.positions[rows, :cols])
