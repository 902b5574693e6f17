"""What the RL loop reads: the config's ``ppo`` section, field for field (one source for
names and defaults), and the values a run derives on top of it.

``rl_settings(cfg, ...)`` makes one from a run's config; tests and benchmarks construct
:class:`RLSettings` directly (every field has the section's default).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from rlhf_tasks.config import FP16_REFUSED, PPOSection

BASE_LR_LORA, BASE_LR_FULL = 3e-4, 1e-6


class RLSettings(PPOSection):
    """The section's fields, plus what the run derives: the learning rate (base rate x
    multiplier), the response length (``data.max_target_tokens`` when the section leaves
    it unset), the reward normalisation the reward step measured, the precision, the seed
    and the compute choices."""

    response_length: int = Field(32, ge=1, le=32768)
    checkpoint_every: int = Field(0, ge=0, description="0: only at the end.")
    learning_rate: float = Field(BASE_LR_LORA, gt=0.0)
    adam_eps: float = 1e-5              # [N+ "Adam epsilon"] 1e-5, as the baselines use
    kl_horizon: int = 10000             # [Ziegler] the adaptive KL controller's horizon
    score_mean: float = 0.0             # reward normalisation, measured by the reward step
    score_std: float = Field(1.0, gt=0.0)
    seed: int = 0
    dtype: str = "fp32"                 # autocast precision: fp32 (off) or bf16
    gradient_checkpointing: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"  # several processes: replicas or shards

    @field_validator("dtype")
    @classmethod
    def _precision(cls, value: str) -> str:
        if value == "fp16":
            raise ValueError(FP16_REFUSED)
        if value not in ("fp32", "bf16"):
            raise ValueError(f"unknown dtype {value!r}; use fp32 or bf16")
        return value

    @property
    def prompts_per_update(self) -> int:
        """Prompts per update on each process (``batch_size`` is per process): each is
        sampled ``samples_per_prompt`` times."""
        return self.batch_size // self.samples_per_prompt


def rl_settings(cfg, score_mean: float = 0.0, score_std: float = 1.0) -> RLSettings:
    """The loop's settings for a run: its ``ppo`` section as it is, the derived values
    added."""
    from rlhf_tasks import models, training

    section = cfg.ppo
    dtype = models.compute_dtype(cfg, training.resolve_device(cfg))
    return RLSettings(
        **section.model_dump(exclude={"response_length"}),
        response_length=section.response_length or cfg.data.max_target_tokens,
        learning_rate=training.learning_rate(BASE_LR_LORA, BASE_LR_FULL, section.lora_rank,
                                             section.learning_rate_multiplier),
        score_mean=score_mean, score_std=score_std, seed=cfg.run.seed,
        dtype=models.dtype_name(dtype),
        gradient_checkpointing=cfg.compute.gradient_checkpointing,
        strategy=cfg.compute.strategy)
