"""The trigger form: Params that mirror a managed RLHF pipeline's parameters.

Each Param maps onto one or more config fields (``PARAM_TO_CONFIG``); ``build_config``
layers them over a base config file and the run's identity.  Bounds here repeat the
pydantic bounds so the form refuses a bad value before a run even starts; pydantic
remains the judge of record (a test keeps the two in step).
"""

from __future__ import annotations

import os
import re
from typing import Any

from airflow.sdk import Param

from rlhf_tasks import config as rlhf_config

PARAM_TO_CONFIG: dict[str, list[str]] = {
    "preference_dataset": ["data.preference_uri"],
    "prompt_dataset": ["data.prompt_uri"],
    "eval_dataset": ["data.eval_uri"],
    "sft_dataset": ["data.sft_uri"],
    "base_model": ["model.base_model"],
    "model_revision": ["model.revision"],
    "prompt_format": ["model.prompt_format"],
    "instruction": ["model.instruction"],
    "prompt_sequence_length": ["data.max_prompt_tokens"],
    "target_sequence_length": ["data.max_target_tokens"],
    "max_bad_fraction": ["data.max_bad_fraction"],
    "reward_model_train_steps": ["reward.train_steps"],
    "reward_model_learning_rate_multiplier": ["reward.learning_rate_multiplier"],
    "reinforcement_learning_train_steps": ["ppo.train_steps"],
    "reinforcement_learning_rate_multiplier": ["ppo.learning_rate_multiplier"],
    "kl_coeff": ["ppo.kl_coef"],
    "lora_rank": ["reward.lora_rank", "sft.lora_rank", "ppo.lora_rank"],
    "run_sft_baseline": ["sft.enabled"],
    "pass_rate_threshold": ["panel.pass_rate_threshold"],
    "panel_mode": ["panel.mode"],
    "verdicts_per_item": ["panel.verdicts_per_item"],
    "approver": ["panel.approver"],
    "backend": ["compute.backend"],
    "dtype": ["compute.dtype"],
    "gradient_checkpointing": ["compute.gradient_checkpointing"],
}

_NULLABLE_URI = {"type": ["null", "string"], "maxLength": 2048}


def _bounds(path: str) -> dict[str, Any]:
    """JSON-schema bounds read off the pydantic field, so form and config agree."""
    section, name = path.split(".")
    field = rlhf_config.PipelineConfig.model_fields[section].annotation.model_fields[name]
    out: dict[str, Any] = {}
    for meta in field.metadata:
        for attr, key in (("ge", "minimum"), ("le", "maximum"), ("gt", "exclusiveMinimum"),
                          ("lt", "exclusiveMaximum")):
            if getattr(meta, attr, None) is not None:
                out[key] = getattr(meta, attr)
    return out


def _num(path: str, default, kind: str, description: str) -> Param:
    return Param(default, type=kind, description=description, **_bounds(path))


def trigger_params() -> dict[str, Param]:
    defaults = rlhf_config.PipelineConfig()
    return {
        "config_file": Param(
            os.environ.get("RLHF_BASE_CONFIG", ""), type="string", maxLength=2048,
            description="Base pipeline config (YAML/JSON, local or s3://). Form values "
                        "below override it; empty fields keep the base config's value."),
        "preference_dataset": Param(None, **_NULLABLE_URI,
                                    description="Human preference data: JSONL, CSV or Parquet "
                                                "(pairs, ranked lists, Vertex style or chat)."),
        "prompt_dataset": Param(None, **_NULLABLE_URI,
                                description="Unlabelled prompts for the RL stage."),
        "eval_dataset": Param(None, **_NULLABLE_URI,
                              description="Held-out prompts for evaluation and the expert "
                                          "panel; must not overlap the training prompts."),
        "sft_dataset": Param(None, **_NULLABLE_URI,
                             description="Prompt + reference response pairs for the "
                                         "supervised baseline."),
        "base_model": Param(None, **_NULLABLE_URI,
                            description="Foundation model: a Hugging Face checkpoint folder "
                                        "(local or s3://) or a hub id in the workers' "
                                        "Hugging Face cache."),
        "model_revision": Param(None, type=["null", "string"], maxLength=200,
                                pattern=r"^[\w./-]+$",
                                description="Hub revision (commit, tag or branch) of a hub id."),
        "prompt_format": Param(defaults.model.prompt_format, type="string",
                               enum=["auto", "chat", "template"],
                               description="chat: the tokenizer's chat template; template: "
                                           "model.prompt_template of the base config; auto: "
                                           "chat when the tokenizer has one."),
        "instruction": Param(None, type=["null", "string"], maxLength=2000,
                             description="Instruction for every prompt: the system message "
                                         "in chat format."),
        "prompt_sequence_length": _num("data.max_prompt_tokens",
                                       defaults.data.max_prompt_tokens, "integer",
                                       "Longest prompt in tokens; longer rows are quarantined."),
        "target_sequence_length": _num("data.max_target_tokens",
                                       defaults.data.max_target_tokens, "integer",
                                       "Longest response in tokens."),
        "max_bad_fraction": _num("data.max_bad_fraction", defaults.data.max_bad_fraction,
                                 "number", "Fail validation when a larger share of rows is bad."),
        "reward_model_train_steps": _num("reward.train_steps", defaults.reward.train_steps,
                                         "integer", "Reward-model training steps."),
        "reward_model_learning_rate_multiplier": _num(
            "reward.learning_rate_multiplier", defaults.reward.learning_rate_multiplier,
            "number", "Multiplier on the reward model's default learning rate."),
        "reinforcement_learning_train_steps": _num(
            "ppo.train_steps", defaults.ppo.train_steps, "integer", "PPO updates."),
        "reinforcement_learning_rate_multiplier": _num(
            "ppo.learning_rate_multiplier", defaults.ppo.learning_rate_multiplier, "number",
            "Multiplier on the policy's default learning rate."),
        "kl_coeff": _num("ppo.kl_coef", defaults.ppo.kl_coef, "number",
                         "KL penalty keeping the tuned model near the foundation model."),
        "lora_rank": _num("ppo.lora_rank", defaults.ppo.lora_rank, "integer",
                          "LoRA rank for reward model, SFT and policy (0 = full tuning)."),
        "run_sft_baseline": Param(defaults.sft.enabled, type="boolean",
                                  description="Also train the supervised baseline."),
        "pass_rate_threshold": _num("panel.pass_rate_threshold",
                                    defaults.panel.pass_rate_threshold, "number",
                                    "Minimum expert pass rate for promotion."),
        "panel_mode": Param(defaults.panel.mode, type="string", enum=["simulated", "human"],
                            description="human: the run waits for reviewers on the review "
                                        "page; simulated: rubric raters (demo and tests)."),
        "verdicts_per_item": _num("panel.verdicts_per_item", defaults.panel.verdicts_per_item,
                                  "integer", "Verdicts each reviewed output needs (quorum)."),
        "approver": Param(None, type=["null", "string"], maxLength=100,
                          description="Airflow user who must sign off a promotion "
                                      "(empty: the gate's policy alone decides)."),
        "backend": Param(defaults.compute.backend, type="string", enum=["local", "kubernetes"],
                         description="Where heavy steps run: a process on the worker, or "
                                     "a pod per step (image, GPUs, secrets: compute.kubernetes "
                                     "in the base config)."),
        "dtype": Param(defaults.compute.dtype, type="string",
                       enum=["auto", "bf16", "fp16", "fp32"],
                       description="Weights and autocast precision (trainable weights keep "
                                   "fp32 master copies); auto: bf16 on a GPU that has it."),
        "gradient_checkpointing": Param(defaults.compute.gradient_checkpointing, type="boolean",
                                        description="Recompute activations in the backward "
                                                    "pass: less memory, more compute."),
    }


def safe_run_id(run_id: str) -> str:
    """The run folder's name for an Airflow run id, one-to-one: letters, digits, '.' and
    '-' stay; '_' becomes '__'; any other character becomes '_' + the hex of each of its
    UTF-8 bytes ('_3a' for ':', '_2b' for '+'), so ``x:1`` and ``x+1`` never share a folder."""
    def escape(match: re.Match) -> str:
        char = match.group()
        return "__" if char == "_" else "".join(f"_{b:02x}" for b in char.encode("utf-8"))

    return re.sub(r"[^A-Za-z0-9.-]", escape, run_id)


def build_config(params: dict[str, Any], dag_id: str, run_id: str) -> rlhf_config.PipelineConfig:
    """Base config file < form values (non-empty) < run identity. Raises BadInput."""
    source = params.get("config_file") or None
    base = rlhf_config.load(source) if source else rlhf_config.PipelineConfig()
    raw = base.dump()
    defaults = trigger_params()
    for name, paths in PARAM_TO_CONFIG.items():
        value = params.get(name)
        if value is None or value == "":
            continue
        # a form value left at its default does not override the base config
        if source and name in defaults and value == defaults[name].value:
            continue
        for path in paths:
            section, field = path.split(".")
            raw[section][field] = value
    raw["run"]["pipeline"] = dag_id
    raw["run"]["run_id"] = safe_run_id(run_id)
    from rlhf_tasks.storage import Storage
    from rlhf_tasks.tracking import resolve_uri

    # relative paths become absolute here, so every step process agrees on them
    raw["storage"]["artifact_root"] = Storage.normalise(raw["storage"]["artifact_root"])
    raw["tracking"]["tracking_uri"] = resolve_uri(raw["tracking"]["tracking_uri"])
    raw["panel"]["store_url"] = resolve_uri(raw["panel"]["store_url"])
    return rlhf_config.validate(raw, f"trigger form of {dag_id}")
