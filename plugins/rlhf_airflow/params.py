"""The trigger form: Params that mirror a managed RLHF pipeline's parameters.

Each Param maps onto one or more config fields (``PARAM_TO_CONFIG``); ``build_config``
layers them over a base config file and the run's identity.  Bounds here repeat the
pydantic bounds so the form refuses a bad value before a run even starts; pydantic
remains the judge of record (a test keeps the two in step).

Who may set what (docs/ARCHITECTURE.md, Trust):

* The form is an allow-list (``PARAM_TO_CONFIG`` + ``config_file``): data and model
  locations, which must lie inside the admin's ``storage.allowed_roots``; training
  hyperparameters; precision.  Any other key in the run's conf stops ``prepare_run``
  with one line naming it.
* Infrastructure and governance (``compute.backend`` and ``compute.kubernetes.*``,
  ``model.trust_remote_code``, ``tracking``, ``storage``, the panel's mode, policy and
  approver, ``data.max_bad_fraction``) come only from config files the admin controls:
  ``$RLHF_BASE_CONFIG``, and files in the folder ``$RLHF_CONFIG_DIR``.  ``config_file``
  may name only those.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
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
    "reward_model_train_steps": ["reward.train_steps"],
    "reward_model_learning_rate_multiplier": ["reward.learning_rate_multiplier"],
    "reinforcement_learning_train_steps": ["ppo.train_steps"],
    "reinforcement_learning_rate_multiplier": ["ppo.learning_rate_multiplier"],
    "kl_coeff": ["ppo.kl_coef"],
    "lora_rank": ["reward.lora_rank", "sft.lora_rank", "ppo.lora_rank"],
    "run_sft_baseline": ["sft.enabled"],
    "dtype": ["compute.dtype"],
    "gradient_checkpointing": ["compute.gradient_checkpointing"],
}

# form fields that name data or a model: each must lie inside the allowed roots
LOCATION_PARAMS = ("preference_dataset", "prompt_dataset", "eval_dataset", "sft_dataset",
                   "base_model")
FORM_FIELDS = frozenset(PARAM_TO_CONFIG) | {"config_file"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

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
            description="Pipeline config: the admin's base config, or a file in the "
                        "admin's config folder ($RLHF_CONFIG_DIR). Form values below "
                        "override it; empty fields keep its value."),
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


def admin_config_source(requested: str | None) -> str | None:
    """The config file a run may start from: ``$RLHF_BASE_CONFIG`` (also when the form
    leaves ``config_file`` empty), or a file inside ``$RLHF_CONFIG_DIR`` (a name relative
    to that folder, or a path in it; symbolic links are followed before the check).
    Anything else is BadInput naming ``config_file``."""
    from rlhf_tasks.errors import BadInput
    from rlhf_tasks.storage import Storage, is_s3

    base = os.environ.get("RLHF_BASE_CONFIG", "").strip() or None
    folder = os.environ.get("RLHF_CONFIG_DIR", "").strip() or None
    requested = (requested or "").strip() or None
    if requested is None or requested == base:
        return base

    canonical = Storage.normalise  # s3 keys tidied; local paths resolved, links followed
    if base and canonical(requested) == canonical(base):
        return base
    if folder:
        root = canonical(folder)
        if is_s3(root):
            candidate = requested if is_s3(requested) else root + "/" + requested
        elif "://" in requested:
            candidate = ""
        else:
            path = Path(requested).expanduser()
            candidate = str(path if path.is_absolute() else Path(root) / path)
        try:
            resolved = canonical(candidate) if candidate else ""
        except BadInput:
            resolved = ""
        if resolved.startswith(root.rstrip("/") + "/"):
            return resolved
    where = " or a file in $RLHF_CONFIG_DIR (" + folder + ")" if folder else ""
    raise BadInput(f"trigger form field 'config_file': {requested!r} is not an admin config "
                   f"file; allowed: the base config ({base or 'none set'}){where}",
                   field="config_file")


def check_form_keys(conf: dict[str, Any]) -> None:
    """Only the form's own fields may come from the run's conf: one line naming the
    first other key (sorted, so the message is stable)."""
    from rlhf_tasks.errors import BadInput

    extra = sorted(set(conf) - FORM_FIELDS)
    if extra:
        raise BadInput(f"trigger form field '{extra[0]}' may not be set when triggering a run "
                       "(infrastructure, governance and panel settings come from the admin's "
                       f"config files); the form's fields are: {', '.join(sorted(FORM_FIELDS))}",
                       field=extra[0])


def check_location(name: str, value: str, storage) -> None:
    """A dataset or model named in the form lies inside the allowed roots (a model may
    also be a hub id, read from the workers' Hugging Face cache)."""
    from rlhf_tasks.errors import BadInput

    if name == "base_model" and _HUB_ID.match(value) and not Path(value).exists():
        return
    try:
        storage.check_read(value)
    except BadInput as exc:
        raise BadInput(f"trigger form field '{name}': {exc}", field=name) from None


def build_config(params: dict[str, Any], dag_id: str, run_id: str, *,
                 conf: dict[str, Any] | None = None,
                 triggered_by: str | None = None) -> rlhf_config.PipelineConfig:
    """Admin config file < form values (non-empty) < run identity. Raises BadInput, with
    one line naming the field, for a key outside the form, a config file the admin did
    not provide, a location outside the allowed roots, or an invalid value."""
    check_form_keys(conf or {})
    source = admin_config_source(params.get("config_file"))
    base = rlhf_config.load(source) if source else rlhf_config.PipelineConfig()
    raw = base.dump()
    defaults = trigger_params()
    from rlhf_tasks.storage import Storage
    from rlhf_tasks.tracking import resolve_uri

    storage = Storage.from_config(base)
    for name, paths in PARAM_TO_CONFIG.items():
        value = params.get(name)
        if value is None or value == "":
            continue
        # a form value left at its default does not override the base config
        if source and name in defaults and value == defaults[name].value:
            continue
        if name in LOCATION_PARAMS:
            check_location(name, str(value), storage)
        for path in paths:
            section, field = path.split(".")
            raw[section][field] = value
    raw["run"]["pipeline"] = dag_id
    raw["run"]["run_id"] = safe_run_id(run_id)
    raw["run"]["triggered_by"] = triggered_by

    # relative paths become absolute here, so every step process agrees on them
    raw["storage"]["artifact_root"] = Storage.normalise(raw["storage"]["artifact_root"])
    raw["tracking"]["tracking_uri"] = resolve_uri(raw["tracking"]["tracking_uri"])
    raw["panel"]["store_url"] = resolve_uri(raw["panel"]["store_url"])
    return rlhf_config.validate(raw, f"trigger form of {dag_id}")
