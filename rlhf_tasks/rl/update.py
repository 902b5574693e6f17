"""The policy update: epochs over the batch in minibatches of microbatches, the clipped
policy loss (and the value loss where a critic trains), one optimizer step per
minibatch."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rlhf_tasks.rl import core
from rlhf_tasks.rl.forwards import autocast
from rlhf_tasks.rl.rollout import Rollouts, cut

if TYPE_CHECKING:
    from rlhf_tasks.rl.trainer import Experience


def update_policy(wrapped, unwrapped, optimizer, params, batch: Rollouts, exp: Experience,
                  s, processes, update: int, device,
                  loss_tokens: str = "batch") -> dict[str, list[float]]:
    """``ppo_epochs`` passes over the batch: a fresh permutation each epoch, minibatches
    (one optimizer step each, global-norm clipping), microbatches (gradient accumulation,
    [length buckets] longest first, each cut to its longest response: the same gradient).
    The clipped policy loss serves every algorithm (with one epoch and one minibatch it is
    the plain policy gradient of RLOO and GRPO); the value loss only where a critic
    trains.  The loss is one token mean over the minibatch's tokens on every process
    (``loss_tokens="batch"``), so a token weighs the same whatever the microbatch size and
    the number of processes; or ([Dr. GRPO], ``"constant"``) the token sum over the
    minibatch's rows times ``response_length``, whatever the responses' lengths.
    Gradients all-reduce once per minibatch (``no_sync`` on the other microbatches)."""
    unwrapped.train()
    critic = exp.values is not None
    stats: dict[str, list[float]] = {k: [] for k in (
        "policy_loss", "policy_clipfrac", "approx_kl", "entropy", "ratio")}
    if critic:
        stats.update(value_loss=[], value_clipfrac=[])
    maskf = batch.maskf
    local = len(batch.ids)
    minibatch = s.batch_size // s.num_minibatches
    micro = min(s.microbatch_size, minibatch)
    shuffle = torch.Generator().manual_seed(s.seed * 7919 + update)
    for epoch in range(s.ppo_epochs):
        order = torch.randperm(local, generator=shuffle)
        for start in range(0, local, minibatch):
            mb_rows = order[start: start + minibatch]
            mb_rows = mb_rows[torch.argsort(batch.lengths[mb_rows].cpu(), descending=True,
                                            stable=True)]
            optimizer.zero_grad(set_to_none=True)
            # one token mean over the whole minibatch, on every process: the token count
            # is summed over processes, and DDP / FSDP average the processes' gradients,
            # so each process divides its token sum by (all tokens / processes)
            if loss_tokens == "constant":
                tokens = torch.tensor(float(len(mb_rows) * s.response_length),
                                      device=maskf.device)
            else:
                tokens = processes.reduce_sum(maskf[mb_rows].sum().double()).float() \
                    / processes.world
            for m_start in range(0, len(mb_rows), micro):
                rows = mb_rows[m_start: m_start + micro]
                w, args = cut(batch, rows)
                m = maskf[rows, :w]
                last = m_start + micro >= len(mb_rows)
                with processes.no_sync(wrapped, last):
                    with autocast(s, device):
                        new_logits, new_values = wrapped(*args, w, s.temperature)
                    if epoch == 0:  # entropy once per update: every row once
                        stats["entropy"].append(_entropy(new_logits, m))
                    # the backward pass overwrites the logits with their gradient
                    new_logprobs = core.selective_logprobs(new_logits, batch.responses[rows, :w],
                                                           consume=True)
                    pg_loss, pg_stats = core.policy_loss(
                        new_logprobs, exp.logprobs[rows, :w], exp.advantages[rows, :w], m,
                        s.clip_range, tokens=tokens)
                    loss = pg_loss
                    if critic:
                        vf_loss, vf_stats = core.value_loss(
                            new_values, exp.values[rows, :w], exp.returns[rows, :w], m,
                            s.value_clip_range, tokens=tokens)
                        loss = loss + s.vf_coef * vf_loss
                    processes.backward(loss)
                with torch.no_grad():
                    for key in ("policy_clipfrac", "approx_kl", "ratio"):
                        stats[key].append(pg_stats[key.removeprefix("policy_")].item())
                    stats["policy_loss"].append(pg_stats["loss"].item())
                    if critic:
                        stats["value_loss"].append(vf_stats["loss"].item())
                        stats["value_clipfrac"].append(vf_stats["clipfrac"].item())
                # free this microbatch's logits before the next forward allocates its own
                del new_logits, new_values, new_logprobs, loss
            processes.clip(params, s.max_grad_norm)
            optimizer.step()
    return stats


def _entropy(logits: torch.Tensor, mask: torch.Tensor) -> float:
    """The policy's mean entropy over the masked positions, a few rows at a time (softmax
    temporaries the size of the logits otherwise); no gradient."""
    with torch.no_grad():
        entropy = torch.cat([core.entropy_from_logits(chunk) for chunk in logits.split(2)])
        return core.masked_mean(entropy, mask).item()


def adamw(params, s, fused: bool = True):
    """AdamW, fused (one kernel for all parameters) where torch supports it on the device
    (not for FSDP2's sharded parameters)."""
    if not fused:
        return torch.optim.AdamW(params, lr=s.learning_rate, eps=s.adam_eps, weight_decay=0.0)
    try:
        return torch.optim.AdamW(params, lr=s.learning_rate, eps=s.adam_eps, weight_decay=0.0,
                                 fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=s.learning_rate, eps=s.adam_eps, weight_decay=0.0)
