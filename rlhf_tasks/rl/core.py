"""The math of PPO for language models: small, pure functions, each unit-tested by hand.

Shapes: ``(batch, response_length)`` per-token tensors with a ``mask`` of the same shape
(1 for a response token up to and including EOS, 0 for padding after it).

Sources, cited where used:
* [N+] Huang et al., "The N Implementation Details of RLHF with PPO" (ICLR blog track 2024)
  and its follow-up "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR
  Summarization" (2024).
* [Ziegler] Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences":
  the per-token KL penalty and the adaptive KL controller.
* [Schulman] J. Schulman, "Approximating KL Divergence" (2020): the k1 and k3 estimators.
* [GAE] Schulman et al. 2015, "High-Dimensional Continuous Control Using GAE".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

# sums a tensor over every process of a data-parallel run (identity in one process)
Reduce = Callable[[torch.Tensor], torch.Tensor]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp_min(1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp_min(1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked entries (Bessel-corrected by default, as TRL and [N+] do);
    one process's case of :func:`global_moments`."""
    return global_moments(values, mask, unbiased=unbiased)[1]


def global_moments(values: torch.Tensor, mask: torch.Tensor, reduce: Reduce = _local,
                   unbiased: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance over the masked entries of the *global* batch: every process's
    sums are added (``reduce``) before dividing, so each process gets the same moments,
    those of the concatenated batch (in one process, ``masked_mean`` and ``masked_var``)."""
    mask = mask.to(values.dtype)
    totals = reduce(torch.stack([(values * mask).sum(), mask.sum()]).double())
    count = totals[1].clamp_min(1.0)
    mean = totals[0] / count
    squares = reduce((((values.double() - mean) ** 2) * mask).sum())
    var = squares / count
    if unbiased and totals[1] > 1:
        var = var * totals[1] / (totals[1] - 1)
    return mean.to(values.dtype), var.to(values.dtype)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8, reduce: Reduce = _local) -> torch.Tensor:
    """Zero mean, unit variance over the masked entries of the global batch (``reduce``:
    see :func:`global_moments`).

    [N+] "Advantage whitening" (shift_mean=True) and "Reward whitening" (shift_mean=False,
    as TRL and [N+] do it): the deviations from the mean are scaled to unit variance and
    the mean is added back, so the batch keeps its mean and gets unit spread.  A single
    entry's sign is *not* kept: in [-1, 11] the -1 becomes 5 - 6/sqrt(72) = +4.29.
    Padding stays zero.
    """
    mean, var = global_moments(values, mask, reduce)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


class _TokenLogprobs(torch.autograd.Function):
    """log_softmax(logits)[token], computed and differentiated a few rows at a time.

    Saves only the logits (which the vocabulary projection produced anyway) and writes
    the gradient ``g * (onehot - softmax)`` straight into one output tensor, so no
    (batch, length, vocab) temporaries beyond the gradient itself are allocated.
    """

    @staticmethod
    def forward(ctx, logits, tokens, rows_per_chunk, overwrite):
        flat, flat_tokens = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1, 1)
        lse = torch.cat([torch.logsumexp(chunk, dim=-1) for chunk in flat.split(rows_per_chunk)])
        out = flat.gather(-1, flat_tokens).squeeze(-1) - lse
        ctx.save_for_backward(logits, tokens, lse)
        ctx.rows_per_chunk, ctx.overwrite = rows_per_chunk, overwrite
        return out.view(tokens.shape)

    @staticmethod
    def backward(ctx, grad_out):
        logits, tokens, lse = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])
        # the gradient overwrites the logits, chunk by chunk, when nothing else can read
        # them any more (the function owns them: see ``selective_logprobs``)
        grad = flat if ctx.overwrite else torch.empty_like(flat)
        g, idx = grad_out.reshape(-1, 1), tokens.reshape(-1, 1)
        n = ctx.rows_per_chunk
        for start in range(0, flat.shape[0], n):
            rows = slice(start, start + n)
            torch.sub(flat[rows], lse[rows, None], out=grad[rows]).exp_()
            grad[rows].mul_(-g[rows]).scatter_add_(-1, idx[rows], g[rows])
        return grad.view(logits.shape), None, None, None


def selective_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                       rows_per_chunk: int = 64, *, consume: bool = False) -> torch.Tensor:
    """``log_softmax(logits)[tokens]`` without materialising the full log-softmax.

    logits (..., V), tokens (...) -> (...).  Memory: the log-softmax is never stored;
    temporaries cover ``rows_per_chunk`` positions at a time (see :class:`_TokenLogprobs`).
    ``consume=True``: the backward pass writes the gradient into ``logits`` itself, so a
    training step holds one (positions, vocabulary) tensor instead of two; the caller
    promises not to read ``logits`` after ``backward()``.
    """
    return _TokenLogprobs.apply(logits, tokens, rows_per_chunk, consume)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` per position: ``logsumexp(z) - sum(p * z)``."""
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1"
               ) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled token's log-probs.

    [Schulman] with ``log r = ref - policy`` for a token sampled from the policy:
    k1 = -log r (unbiased, can be negative per token); k3 = (r - 1) - log r (unbiased and
    always >= 0, lower variance).
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1' or 'k3'")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor
                  ) -> torch.Tensor:
    """[Ziegler] r_t = -beta * KL_t on every response token, plus the reward-model score on
    the last one (the EOS token, or the last token of a response that never ended)."""
    rewards = -kl_coef * kl * mask.to(kl.dtype)
    last = mask.long().sum(1).clamp_min(1) - 1
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[GAE] advantages and returns over the response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1}.  Past the
    last token V and r are zero, so the episode ends there.  Returns = A + V.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    length = rewards.shape[1]
    last_gae = torch.zeros_like(rewards[:, 0])
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]
        advantages[:, t] = last_gae
    return advantages, (advantages + values) * mask


def _token_sum_over(values: torch.Tensor, mask: torch.Tensor, tokens) -> torch.Tensor:
    """sum(values * mask) / ``tokens``: with ``tokens`` the token count of the whole
    minibatch a microbatch belongs to, the microbatches' losses add up to one token mean
    over the minibatch (every token weighs the same, whatever microbatch holds it); None:
    this tensor's own token mean."""
    if tokens is None:
        return masked_mean(values, mask)
    return (values * mask.to(values.dtype)).sum() / tokens


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip: float, tokens=None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective (PPO), as a loss (a token mean: see
    :func:`_token_sum_over` for ``tokens``); with its own token mean, the clip fraction,
    the mean ratio and approx KL."""
    # padding positions compare nothing: a log-prob there is not from the rollout, and
    # exp() of it could overflow (inf * 0 = NaN in a masked mean)
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs, 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    per_token = torch.maximum(unclipped, clipped)
    loss = _token_sum_over(per_token, mask, tokens)
    with torch.no_grad():
        stats = {
            "loss": masked_mean(per_token, mask),
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            # [N+] approx KL(rollout || current) over tokens the rollout sampled, k3
            # [Schulman]: r = p_current / p_rollout, (r - 1) - log r
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip: float, tokens=None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """[N+] "Value function loss clipping": 0.5 * max((V - R)^2, (clip(V) - R)^2), a token
    mean (``tokens``: see :func:`_token_sum_over`)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    per_token = 0.5 * torch.maximum(loss_unclipped, loss_clipped)
    loss = _token_sum_over(per_token, mask, tokens)
    with torch.no_grad():
        stats = {"loss": masked_mean(per_token, mask),
                 "clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask)}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the masked tokens (1 = perfect, <= 0 = useless)."""
    var_returns = masked_var(returns, mask, unbiased=False)
    if var_returns.item() == 0:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask, unbiased=False) / var_returns)


@dataclass
class KLController:
    """The KL coefficient beta: fixed, or adaptive towards a target KL [Ziegler] sec. 2.2.

    Adaptive: e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n / horizon),
    with n the episodes in the batch.
    """

    value: float
    target: float | None = None
    horizon: int = 10000

    def update(self, current_kl: float, n_steps: int) -> None:
        if self.target is None or math.isnan(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]


def response_mask(responses: torch.Tensor, eos_token_id) -> tuple[torch.Tensor, torch.Tensor]:
    """[N+] "Truncate at EOS": mask of the tokens up to and including the first stop token
    (``eos_token_id``: one id or a list, e.g. every EOS of Llama 3 and the chat template's
    end of turn), and whether one was emitted at all (responses that never end are
    penalised)."""
    stops = torch.as_tensor(eos_token_id, device=responses.device).reshape(-1)
    is_eos = torch.isin(responses, stops)
    has_eos = is_eos.any(1)
    width = responses.shape[1]
    first = torch.where(has_eos, is_eos.float().argmax(1), torch.full_like(has_eos, width - 1,
                                                                        dtype=torch.long))
    positions = torch.arange(width, device=responses.device).unsqueeze(0)
    return (positions <= first.unsqueeze(1)).long(), has_eos


def linear_schedule(total_updates: int):
    """[N+] learning-rate annealing: linear decay from 1 to 0 over the updates."""
    return lambda update: max(0.0, 1.0 - update / max(1, total_updates))



def slope(values: list[float]) -> float:
    """Least-squares slope of ``values`` against their index (per step); 0 for fewer than
    two.  The KL's slope over the last updates says whether the policy is still running
    away from its reference."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    num = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values))
    return num / sum((x - mean_x) ** 2 for x in range(n))
