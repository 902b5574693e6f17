"""The difference between the RL algorithms, in one place: how each turns an update's
scores into per-token advantages (after verl's ``core_algos``).

Every estimator has one signature::

    estimate(scores, kl, mask, values, *, beta, group, settings, reduce)
        -> (advantages, returns)

* ``scores`` (B,): the reward model's scores, normalised and EOS-penalised;
* ``kl`` (B, W): the per-token KL to the reference (masked);
* ``mask`` (B, W): the response tokens;
* ``values`` (B, W): the critic's values, or None for an estimator without a critic;
* ``beta``: the KL coefficient now (fixed, or the adaptive controller's);
* ``group``: samples per prompt; rows ``[g * group, (g + 1) * group)`` answer one prompt;
* ``reduce``: sums a tensor over every process (whitening over the global batch).

Returns per-token advantages (B, W) and, for an estimator with a critic, the value
targets (else None).  The KL penalty is the same for all: PPO spreads ``-beta * KL`` over
the tokens and discounts it with GAE; the critic-free estimators subtract ``beta`` times the
response's summed KL from its score before comparing the group's samples (as RLOO's paper
and TRL's RLOO do), so one coefficient and one controller serve every algorithm.

Sources: [RLOO] Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
Optimization for Learning from Human Feedback in LLMs"; [GRPO] Shao et al. 2024,
"DeepSeekMath"; [Dr. GRPO] Liu et al. 2025, "Understanding R1-Zero-Like Training: A
Critical Perspective" (no division by the group's std, and the loss summed over tokens
and divided by a constant rather than by each response's length).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rlhf_tasks.rl import core

GROUP_STD_EPS = 1e-4  # [GRPO] as TRL's GRPOTrainer: a group whose samples all score the same


@dataclass(frozen=True)
class Estimator:
    estimate: Callable
    need_critic: bool          # a value model trains beside the policy (verl's need_critic)
    loss_tokens: str = "batch"  # the policy loss's divisor: "batch" (the minibatch's
    # response tokens) or "constant" (rows x response_length: [Dr. GRPO] no length bias)


def gae_advantages(scores, kl, mask, values, *, beta, group, settings, reduce):
    """[PPO] reward = score at the last token - beta * KL per token; GAE; advantages
    whitened over the global batch."""
    rewards = core.token_rewards(scores, kl, beta, mask)
    if settings.whiten_rewards:  # [N+ "Reward whitening"] (scale only)
        rewards = core.masked_whiten(rewards, mask, shift_mean=False, reduce=reduce)
    advantages, returns = core.gae(rewards, values, mask, settings.gamma, settings.lam)
    # [N+ "Advantage whitening"] over the global batch's response tokens
    return core.masked_whiten(advantages, mask, reduce=reduce), returns


def sequence_rewards(scores: torch.Tensor, kl: torch.Tensor, beta: float) -> torch.Tensor:
    """A response's reward: its score minus beta times its summed KL."""
    return scores - beta * kl.sum(1)


def _grouped(rewards: torch.Tensor, group: int) -> torch.Tensor:
    if len(rewards) % group:
        raise ValueError(f"{len(rewards)} responses do not make groups of {group}")
    return rewards.view(-1, group)


def _per_token(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return advantages[:, None] * mask.to(advantages.dtype)


def leave_one_out(scores, kl, mask, values, *, beta, group, settings, reduce):
    """[RLOO] each sample's reward minus the mean reward of the prompt's other samples."""
    rewards = _grouped(sequence_rewards(scores, kl, beta), group)
    others = (rewards.sum(1, keepdim=True) - rewards) / (group - 1)
    return _per_token((rewards - others).reshape(-1), mask), None


def group_normalised(scores, kl, mask, values, *, beta, group, settings, reduce):
    """[GRPO] (reward - the group's mean) / (the group's std + eps), std with Bessel's
    correction (as TRL)."""
    rewards = _grouped(sequence_rewards(scores, kl, beta), group)
    centred = rewards - rewards.mean(1, keepdim=True)
    scaled = centred / (rewards.std(1, keepdim=True) + GROUP_STD_EPS)
    return _per_token(scaled.reshape(-1), mask), None


def group_centred(scores, kl, mask, values, *, beta, group, settings, reduce):
    """[Dr. GRPO] reward - the group's mean: no std division (which weighs prompts whose
    samples barely differ the most)."""
    rewards = _grouped(sequence_rewards(scores, kl, beta), group)
    centred = rewards - rewards.mean(1, keepdim=True)
    return _per_token(centred.reshape(-1), mask), None


ESTIMATORS: dict[str, Estimator] = {
    "ppo": Estimator(gae_advantages, need_critic=True),
    "rloo": Estimator(leave_one_out, need_critic=False),
    "grpo": Estimator(group_normalised, need_critic=False),
    "dr_grpo": Estimator(group_centred, need_critic=False, loss_tokens="constant"),
}


def estimator(name: str) -> Estimator:
    if name not in ESTIMATORS:
        raise ValueError(f"unknown algorithm {name!r}; use one of {sorted(ESTIMATORS)}")
    return ESTIMATORS[name]
