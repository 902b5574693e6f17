"""Build the models the RL loop needs, in one of two memory layouts (see
docs/ARCHITECTURE.md).  An algorithm without a value model (rloo, grpo) has no critic:
policy (its reference through disabled adapters, or a frozen copy) and the frozen reward
model.

``shared`` (LoRA, the default): the policy is the base model with a LoRA adapter and the
reference is the same weights with the adapter disabled; the critic is a LoRA adapter
(plus a trainable copy of the score head) on the reward model, and the reward is the
critic with its adapter disabled.  Two base-model copies in memory: policy and reward.

``separate`` (what TRL's PPOTrainer does, and the only choice with full tuning): policy,
a frozen reference copy (unless LoRA), the frozen reward model and a value model that is
a trainable copy of the reward model.  Up to four copies.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rlhf_tasks.config import LoraFields
from rlhf_tasks.models import unwrap_peft

if TYPE_CHECKING:
    from torch import nn


@dataclass
class Models:
    """What the RL loop trains and reads.  ``None`` entries share weights with a trained model:

    * ``reference=None``: the policy is a PEFT model; the reference is the same weights
      with the adapters disabled (no second copy of the base model).
    * ``reward=None``: the critic is a PEFT adapter on the reward model; the reward is the
      critic with its adapters disabled (value model initialised from the reward model,
      as InstructGPT did, at the cost of one base model instead of two).
    * ``critic=None``: an algorithm without a value model; ``reward`` is then the reward
      model itself.
    """

    policy: nn.Module            # causal LM, trainable
    critic: nn.Module | None     # sequence-classification model (value head), trainable
    reference: nn.Module | None = None
    reward: nn.Module | None = None


def lora_config(section: LoraFields, task_type: str, modules_to_save: list[str] | None = None):
    """PEFT LoRA settings from a config section's LoRA fields (``lora_alpha`` None: 2 x
    rank)."""
    from peft import LoraConfig

    rank = section.lora_rank
    return LoraConfig(r=rank, lora_alpha=section.lora_alpha or 2 * rank,
                      lora_dropout=section.lora_dropout, bias="none", task_type=task_type,
                      modules_to_save=modules_to_save,
                      target_modules=section.lora_target_modules)


def build_models(policy_base, reward_model, *, lora: LoraFields | None = None,
                 critic: bool = True, layout: str = "shared", score_mean: float = 0.0,
                 score_std: float = 1.0) -> Models:
    """``policy_base``: a causal LM (the policy RL starts from, and its KL reference);
    ``reward_model``: a sequence-classification model with one label (its LoRA, if any,
    already merged).  Both are consumed (wrapped in place).  ``lora``: the LoRA fields
    (a config section; default rank 8; rank 0 tunes every weight).  ``critic``: whether
    the algorithm trains a value model.  Trainable weights (adapters, the value head,
    fully tuned weights) are upcast to fp32 master copies.  The critic's head starts as
    the reward head on the RL reward scale, ``(score - score_mean) / score_std``
    (:func:`normalise_value_head`)."""
    from rlhf_tasks.models import upcast_trainable

    models = _build(policy_base, reward_model, lora or LoraFields(), layout, critic)
    upcast_trainable(models.policy)
    if models.critic is not None:
        normalise_value_head(models.critic, score_mean, score_std)
        upcast_trainable(models.critic)
    return models


def normalise_value_head(critic, mean: float, std: float) -> None:
    """Give the critic's trainable head a bias and put it on the normalised reward scale:
    ``w / std``, ``(b - mean) / std``.  PPO's rewards are ``(score - mean) / std``; a value
    head left on the raw scale starts shifted by the mean and ``std`` times too wide, and
    value clipping lets it move only ``value_clip_range`` per update.  In the shared layout
    only the adapter's copy of the head changes: with the adapter disabled the model is
    still the reward model, on its raw scale."""
    import torch
    from torch import nn

    inner = unwrap_peft(critic)
    holder = inner.score
    copies = getattr(holder, "modules_to_save", None)  # PEFT's trainable copy of the head
    head = copies["default"] if copies is not None else holder
    new = nn.Linear(head.in_features, head.out_features, bias=True,
                    device=head.weight.device, dtype=torch.float32)
    with torch.no_grad():
        new.weight.copy_(head.weight.float() / std)
        bias = head.bias.float() if head.bias is not None else torch.zeros_like(new.bias)
        new.bias.copy_((bias - mean) / std)
    new.requires_grad_(True)
    if copies is not None:
        copies["default"] = new
    else:
        inner.score = new


def _build(policy_base, reward_model, lora: LoraFields, layout: str, critic: bool) -> Models:
    from peft import get_peft_model

    if layout not in ("shared", "separate"):
        raise ValueError(f"unknown model layout {layout!r}; use 'shared' or 'separate'")
    reward_model.requires_grad_(False)
    if lora.lora_rank > 0:
        policy = get_peft_model(policy_base, lora_config(lora, "CAUSAL_LM"))
        reference = None
    else:
        reference = copy.deepcopy(policy_base).requires_grad_(False).eval()
        policy = policy_base.requires_grad_(True)
    if not critic:  # the reward model as it is: nothing of it trains
        return Models(policy=policy, critic=None, reference=reference,
                      reward=reward_model.eval())
    if layout == "shared" and lora.lora_rank > 0:
        value = get_peft_model(reward_model, lora_config(lora, "SEQ_CLS", ["score"]))
        return Models(policy=policy, critic=value, reference=reference, reward=None)
    value = copy.deepcopy(reward_model)
    if lora.lora_rank > 0:
        value = get_peft_model(value, lora_config(lora, "SEQ_CLS", ["score"]))
    else:
        value.requires_grad_(True)
    return Models(policy=policy, critic=value, reference=reference, reward=reward_model.eval())


def random_llama(vocab_size: int, hidden: int, layers: int, heads: int, *, seed: int = 0,
                 intermediate: int | None = None, pad_token_id: int = 0, bos_token_id: int = 1,
                 eos_token_id: int = 2, max_positions: int = 512,
                 attn_implementation: str = "eager"):
    """A random tiny Llama (causal LM) for tests and benchmarks, and its config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden,
                         intermediate_size=intermediate or 4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=max_positions,
                         pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, tie_word_embeddings=False, num_labels=1)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), config


def sequence_classifier_like(config, seed: int = 1):
    """A random one-label sequence classifier with the same shapes (a stand-in reward model)."""
    import torch
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config)
