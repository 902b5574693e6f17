"""The forward passes of the RL loop: the policy's response logits, the critic's
per-token values (the reward model's score comes from :mod:`rlhf_tasks.reward_model`),
precision, gradient checkpointing, dropout, and the module DDP wraps."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from rlhf_tasks.models import unwrap_peft
from rlhf_tasks.reward_model import backbone_and_head


def response_logits(model, ids, mask, positions, width: int, temperature: float):
    """Logits predicting the last ``width`` tokens, divided by the sampling temperature.

    [N+ "Correct log-probs for temperature"]: rollouts sample from logits / T, so the
    training log-probs must be computed from logits / T too.  ``logits_to_keep`` computes
    the vocabulary projection only for the response positions, not for the prompt.
    """
    length = ids.shape[1]
    keep = torch.arange(length - width - 1, length - 1, device=ids.device)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                   logits_to_keep=keep, use_cache=False).logits.float()
    return logits.div_(temperature) if temperature != 1.0 else logits


def token_values(critic, ids, mask, positions, width: int):
    """Per-token values for the last ``width`` positions (the state before each token)."""
    backbone, head = backbone_and_head(critic)
    hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=positions,
                      use_cache=False).last_hidden_state
    return head(hidden[:, -width - 1:-1]).squeeze(-1).float()


def adapters_disabled(model):
    """Context: the PEFT model's base weights (the reference / the reward model)."""
    if hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return contextlib.nullcontext()


def disable_dropout(model: nn.Module) -> None:
    """[N+ "Disable dropout"]: dropout would make the PPO ratio differ from 1 even
    before any update, so it is switched off in every model: ``nn.Dropout`` modules, the
    probabilities models keep as float attributes and pass to ``F.dropout`` themselves
    (OPT's ``self.dropout``, ``attention_dropout``, ``activation_dropout`` ...), and the
    config's."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float) and not isinstance(value, bool):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "attn_pdrop"):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


def autocast(settings, device) -> contextlib.AbstractContextManager:
    """Mixed precision for forward passes: weights that train stay fp32 (master copies)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.dtype)
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=dtype) if dtype else contextlib.nullcontext()


def enable_gradient_checkpointing(*modules: nn.Module) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant: works with
    frozen inputs and LoRA)."""
    for module in modules:
        inner = unwrap_peft(module)
        inner.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})


class PolicyAndValue(nn.Module):
    """One module over policy and critic, so DDP wraps (and one optimizer steps) both;
    ``critic`` None for an algorithm without a value model (values None)."""

    def __init__(self, policy: nn.Module, critic: nn.Module | None):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, ids, mask, positions, width: int, temperature: float):
        logits = response_logits(self.policy, ids, mask, positions, width, temperature)
        if self.critic is None:
            return logits, None
        return logits, token_values(self.critic, ids, mask, positions, width)
