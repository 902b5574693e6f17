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
* Infrastructure and governance (``GOVERNANCE``: the ``panel``, ``registry``, ``storage``,
  ``tracking`` and ``schedule`` sections, ``compute`` but for precision, the gating eval set
  and its rules, ``model.trust_remote_code``) come only from the admin's base config,
  ``$RLHF_BASE_CONFIG``.  ``config_file`` may name a file in the admin's folder
  ``$RLHF_CONFIG_DIR``, which brings run defaults only: whatever it says about governance
  is replaced by the base config's.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from airflow.sdk import Param

from rlhf_tasks import config as rlhf_config

PARAM_TO_CONFIG: dict[str, list[str]] = {
    "preference_dataset": ["data.preference_uri"],
    "prompt_dataset": ["data.prompt_uri"],
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
    "algorithms": ["tuning.algorithms"],
    "samples_per_prompt": ["ppo.samples_per_prompt"],
    "lora_rank": ["reward.lora_rank", "sft.lora_rank", "ppo.lora_rank", "dpo.lora_rank"],
    "run_sft_baseline": ["sft.enabled"],
    "eval_max_new_tokens": ["evaluation.max_new_tokens"],
    "eval_temperature": ["evaluation.temperature"],
    "dtype": ["compute.dtype"],
    "gradient_checkpointing": ["compute.gradient_checkpointing"],
}

# form fields that name data or a model: each must lie inside the allowed roots
LOCATION_PARAMS = ("preference_dataset", "prompt_dataset", "sft_dataset", "base_model")
FORM_FIELDS = frozenset(PARAM_TO_CONFIG) | {"config_file"}
# what only the base config decides: whole sections, and fields of the others (None: every
# field of the section but those listed after it, which a run may choose)
GOVERNANCE_SECTIONS = ("panel", "registry", "storage", "tracking", "schedule", "cost")
GOVERNANCE_FIELDS: dict[str, tuple[str, ...]] = {
    "data": ("eval_uri", "max_bad_fraction", "min_eval_rows", "expectations_dir",
             "max_file_mb"),
    "model": ("trust_remote_code", "hub_repos", "hub_downloads"),
    "evaluation": ("max_prompts", "baselines"),
}
RUN_CHOSEN_COMPUTE = ("dtype", "gradient_checkpointing", "attn_implementation")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _bounds(path: str) -> dict[str, Any]:
    """JSON-schema bounds read off the pydantic field, so form and config agree."""
    field = _field(path)
    out: dict[str, Any] = {}
    for meta in field.metadata:
        for attr, key in (("ge", "minimum"), ("le", "maximum"), ("gt", "exclusiveMinimum"),
                          ("lt", "exclusiveMaximum")):
            if getattr(meta, attr, None) is not None:
                out[key] = getattr(meta, attr)
    return out


# the form's sections, in order (the panel's settings are governance: no form field)
SECTIONS = {
    "config": "Pipeline config",
    "data": "Data",
    "model": "Foundation model and prompt format",
    "reward": "Reward model",
    "ppo": "Tuning (RL or DPO; a bake-off of several)",
    "evaluation": "Evaluation",
    "compute": "Compute",
}

# name -> (section, title, description); each maps onto PARAM_TO_CONFIG[name]
FORM: dict[str, tuple[str, str, str]] = {
    "preference_dataset": ("data", "Preference dataset",
                           "Human preference data: JSONL, CSV or Parquet (pairs, ranked lists, "
                           "Vertex style or chat). Must lie inside the admin's allowed roots."),
    "prompt_dataset": ("data", "Prompt dataset", "Unlabelled prompts for the RL stage."),
    "sft_dataset": ("data", "SFT dataset",
                    "Prompt + reference response pairs for the supervised baseline."),
    "prompt_sequence_length": ("data", "Prompt sequence length",
                               "Longest prompt in tokens; longer rows are quarantined."),
    "target_sequence_length": ("data", "Target sequence length", "Longest response in tokens."),
    "base_model": ("model", "Foundation model",
                   "A Hugging Face checkpoint folder (local or s3://) or a hub id in the "
                   "workers' Hugging Face cache."),
    "model_revision": ("model", "Model revision",
                       "Hub revision (commit, tag or branch) of a hub id."),
    "prompt_format": ("model", "Prompt format",
                      "chat: the tokenizer's chat template; template: the config's "
                      "model.prompt_template; auto: chat when the tokenizer has one."),
    "instruction": ("model", "Instruction",
                    "Instruction for every prompt: the system message in chat format."),
    "reward_model_train_steps": ("reward", "Reward model train steps",
                                 "Optimizer steps of the reward model."),
    "reward_model_learning_rate_multiplier": (
        "reward", "Reward model learning-rate multiplier",
        "Times the reward model's base learning rate."),
    "lora_rank": ("reward", "LoRA rank",
                  "LoRA rank for reward model, SFT and policy (0 = full tuning)."),
    "reinforcement_learning_train_steps": ("ppo", "PPO updates", "PPO updates (RL steps)."),
    "reinforcement_learning_rate_multiplier": ("ppo", "Policy learning-rate multiplier",
                                               "Times the policy's base learning rate."),
    "kl_coeff": ("ppo", "KL coefficient",
                 "KL penalty keeping the tuned model near the foundation model."),
    "algorithms": ("ppo", "Algorithms",
                   "Empty: the config's RL algorithm. One: that algorithm. Several: a bake-off, "
                   "one training task each, judged side by side in one blinded batch; the "
                   "gate promotes the best that beats the champion (Holm-corrected)."),
    "samples_per_prompt": ("ppo", "Samples per prompt",
                           "Responses sampled per prompt (k): RLOO and GRPO compare a "
                           "prompt's samples, and need 2 or more."),
    "run_sft_baseline": ("ppo", "Train the SFT baseline",
                         "Also train the supervised baseline the panel compares against."),
    "eval_max_new_tokens": ("evaluation", "Max new tokens",
                            "Longest answer each model gives to an eval prompt."),
    "eval_temperature": ("evaluation", "Temperature",
                         "Sampling temperature of every model under comparison (0: greedy)."),
    "dtype": ("compute", "Precision",
              "Weights and autocast precision (trainable weights keep fp32 master copies); "
              "auto: bf16 on a GPU that has it."),
    "gradient_checkpointing": ("compute", "Gradient checkpointing",
                               "Recompute activations in the backward pass: less memory, "
                               "more compute."),
}
_NULLABLE = {"preference_dataset", "prompt_dataset", "sft_dataset",
             "base_model", "model_revision", "instruction"}


def _field(path: str):
    section, name = path.split(".")
    return rlhf_config.PipelineConfig.model_fields[section].annotation.model_fields[name]


# k divides the batch (whole groups per update): the form offers the powers of two
_SCHEMAS = {"samples_per_prompt": {"type": "integer", "enum": [1, 2, 4, 8, 16]}}


def _schema(name: str) -> dict[str, Any]:
    """The JSON schema of a form field, read off its config field: type, bounds, enum."""
    if name in _SCHEMAS:
        return _SCHEMAS[name]
    annotation = _field(PARAM_TO_CONFIG[name][0]).annotation
    if get_origin(annotation) is list:  # a multi-select of the allowed names
        names = list(get_args(get_args(annotation)[0]))
        return {"type": "array", "items": {"type": "string", "enum": names},
                "uniqueItems": True, "maxItems": len(names), "examples": names}
    if get_origin(annotation) is Literal:
        return {"type": "string", "enum": list(get_args(annotation))}
    if name in _NULLABLE:
        extra = ({"pattern": r"^[\w./-]+$", "maxLength": 200} if name == "model_revision"
                 else {"maxLength": 2000} if name == "instruction" else {"maxLength": 2048})
        return {"type": ["null", "string"], **extra}
    kind = {bool: "boolean", int: "integer", float: "number"}[annotation]
    return {"type": kind, **_bounds(PARAM_TO_CONFIG[name][0])}


def form_defaults(base: rlhf_config.PipelineConfig | None = None) -> dict[str, Any]:
    """What the form shows before anyone edits it: the base config's values."""
    base = base or rlhf_config.PipelineConfig()
    out: dict[str, Any] = {}
    for name, paths in PARAM_TO_CONFIG.items():
        section, field = paths[-1].split(".")
        value = getattr(getattr(base, section), field)
        out[name] = None if value == "" and name in _NULLABLE else value
    return out


def trigger_params(base: rlhf_config.PipelineConfig | None = None) -> dict[str, Param]:
    """The trigger form: one titled, described field per ``FORM`` entry, in sections,
    each showing the base config's value (``$RLHF_BASE_CONFIG``, read at parse time)."""
    if base is None:
        from rlhf_airflow.scheduling import base_config

        base = base_config()
    defaults = form_defaults(base)
    choices = admin_config_choices()
    params = {"config_file": Param(
        os.environ.get("RLHF_BASE_CONFIG", ""), type="string", maxLength=2048,
        title="Config file", section=SECTIONS["config"],
        description="The admin's base config, or a file in the admin's config folder "
                    "($RLHF_CONFIG_DIR). The fields below show the base config's values; "
                    "what you change wins over the file, even a value equal to a default.",
        # the form offers the admin's files as a list; prepare_run refuses any other
        **({"examples": list(choices), "values_display": choices} if choices else {}))}
    for name, (section, title, description) in FORM.items():
        params[name] = Param(defaults[name], title=title, description=description,
                             section=SECTIONS[section], **_schema(name))
    return params


CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def admin_config_choices() -> dict[str, str]:
    """The config files a run may start from, for the form's list (value -> label): the
    base config, and the files of a local ``$RLHF_CONFIG_DIR`` by name (parse time; an S3
    folder is not listed, its files are typed by name)."""
    base = os.environ.get("RLHF_BASE_CONFIG", "").strip()
    folder = os.environ.get("RLHF_CONFIG_DIR", "").strip()
    choices = {base: f"{Path(base).name} (base config)"} if base else {}
    if folder and "://" not in folder and Path(folder).is_dir():
        root = Path(folder).resolve()
        for path in sorted(Path(folder).iterdir()):
            real = path.resolve()  # a link out of the folder is not an admin file
            if path.suffix in CONFIG_SUFFIXES and real.is_file() and \
                    real.is_relative_to(root) and (not base or real != Path(base).resolve()):
                choices[path.name] = path.name
    return choices


def safe_run_id(run_id: str) -> str:
    """The run folder's name for an Airflow run id, one-to-one: letters, digits, '.' and
    '-' stay; '_' becomes '__'; any other character becomes '_' + the hex of each of its
    UTF-8 bytes ('_3a' for ':', '_2b' for '+'), so ``x:1`` and ``x+1`` never share a folder.
    A leading '.' becomes '_2e': no run folder is '.', '..' or hidden."""
    def escape(match: re.Match) -> str:
        char = match.group()
        return "__" if char == "_" else "".join(f"_{b:02x}" for b in char.encode("utf-8"))

    folder = re.sub(r"[^A-Za-z0-9.-]", escape, run_id)
    return "_2e" + folder[1:] if folder.startswith(".") else folder


def admin_config_source(requested: str | None) -> str | None:
    """The config file a run may start from: ``$RLHF_BASE_CONFIG`` (also when the form
    leaves ``config_file`` empty), or a file inside ``$RLHF_CONFIG_DIR`` (a name relative
    to that folder, or a path in it; symbolic links are followed before the check).
    Anything else is BadInput naming ``config_file``."""
    from rlhf_tasks.errors import BadInput
    from rlhf_tasks.storage import Storage, is_remote

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
        if is_remote(root):
            candidate = requested if is_remote(requested) else root + "/" + requested
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


def admin_base_config(source: str | None, loaded: rlhf_config.PipelineConfig
                      ) -> rlhf_config.PipelineConfig:
    """``$RLHF_BASE_CONFIG`` (``loaded`` when the run started from it; the defaults when
    no base config is set)."""
    from rlhf_airflow.run_config import runtime_base_config

    base = os.environ.get("RLHF_BASE_CONFIG", "").strip() or None
    return loaded if base is not None and source == base else runtime_base_config()


def with_governance(raw: dict[str, Any], admin: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with every governance setting replaced by the admin's base config's."""
    for section in GOVERNANCE_SECTIONS:
        raw[section] = admin[section]
    for section, fields in GOVERNANCE_FIELDS.items():
        for field in fields:
            raw[section][field] = admin[section][field]
    for field, value in admin["compute"].items():
        if field not in RUN_CHOSEN_COMPUTE:
            raw["compute"][field] = value
    return raw


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


_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def check_hub_model(value: str, revision: str | None, hub_repos: list[str]) -> None:
    """A hub id named in the form: on the admin's list (``model.hub_repos``) and pinned to
    a commit (``model_revision``: 40 hex digits; a branch, tag or ``refs/pr/N`` moves)."""
    from rlhf_tasks.errors import BadInput

    if value not in hub_repos:
        raise BadInput(f"trigger form field 'base_model': hub model {value!r} is not on the "
                       f"admin's list (model.hub_repos: {', '.join(hub_repos) or 'none'})",
                       field="base_model")
    if not revision or not _COMMIT.match(revision):
        raise BadInput(f"trigger form field 'model_revision': a hub model is pinned to a "
                       f"commit (40 hex digits), got {revision!r}", field="model_revision")


def is_hub_id(value: str) -> bool:
    return bool(_HUB_ID.match(value)) and not Path(value).exists()


def check_location(name: str, value: str, storage) -> str:
    """A dataset or model named in the form lies inside the allowed roots; returns it
    normalised (``..`` and links resolved, S3 keys tidied), as the steps will read it.  A
    model may also be a hub id (``check_hub_model``), returned as it is."""
    from rlhf_tasks.errors import BadInput

    if name == "base_model" and is_hub_id(value):
        return value
    try:
        return storage.check_read(value)
    except BadInput as exc:
        raise BadInput(f"trigger form field '{name}': {exc}", field=name) from None


def build_config(params: dict[str, Any], dag_id: str, run_id: str, *,
                 conf: dict[str, Any] | None = None,
                 triggered_by: str | None = None) -> rlhf_config.PipelineConfig:
    """Admin config file < form values set for this run < run identity.

    A value is set for this run when its key is in the run's ``conf`` (every non-empty
    value of ``params`` when ``conf`` is None), and then it wins, even when it equals a
    default.  One exception keeps the UI honest: the form shows the base config's values,
    and the UI sends every field, so when the run picked another admin file
    (``config_file``), a field still showing the base config's value is one nobody
    edited, and that file decides it.

    Raises BadInput, with one line naming the field, for a key outside the form, a config
    file the admin did not provide, a location outside the allowed roots, or an invalid
    value."""
    check_form_keys(conf or {})
    source = admin_config_source(params.get("config_file"))
    base = rlhf_config.load(source) if source else rlhf_config.PipelineConfig()
    raw = with_governance(base.dump(), admin_base_config(source, base).dump())
    base = rlhf_config.validate(raw, source or "the default config")
    explicit = set(conf) if conf is not None else set(params)
    shown: dict[str, Any] = {}
    if source and source != os.environ.get("RLHF_BASE_CONFIG", "").strip():
        from rlhf_airflow.scheduling import base_config

        shown = form_defaults(base_config())
    from rlhf_tasks.storage import Storage
    from rlhf_tasks.tracking import resolve_uri

    storage = Storage.from_config(base)
    chosen: set[str] = set()
    for name, paths in PARAM_TO_CONFIG.items():
        value = params.get(name)
        if name not in explicit or value is None or value == "":
            continue  # not set for this run: the config file decides
        if name in shown and value == shown[name]:
            continue  # the base config's value, unedited, on a run of another file
        if name in LOCATION_PARAMS:
            value = check_location(name, str(value), storage)
        for path in paths:
            section, field = path.split(".")
            raw[section][field] = value
        chosen.add(name)
    model = raw["model"]["base_model"]
    if {"base_model", "model_revision"} & chosen and is_hub_id(model):
        # the run chose the hub model or its revision: the admin's list and a pinned commit
        # (the base config's own model, at a commit, needs no listing)
        admin_model = admin_base_config(source, base).model.base_model
        check_hub_model(model, raw["model"]["revision"],
                        list(raw["model"]["hub_repos"]) + [admin_model])
    raw["run"]["pipeline"] = dag_id
    raw["run"]["run_id"] = safe_run_id(run_id)
    raw["run"]["triggered_by"] = triggered_by
    # who the run's people are is set by prepare_run and the sign-off, never by a file
    raw["run"]["triggered_by_id"] = raw["run"]["approved_by"] = None
    # which candidate a task trains is the DAG's to say, task by task
    raw["tuning"]["candidate"] = None

    # relative paths become absolute here, so every step process agrees on them
    raw["storage"]["artifact_root"] = Storage.normalise(raw["storage"]["artifact_root"])
    raw["tracking"]["tracking_uri"] = resolve_uri(raw["tracking"]["tracking_uri"])
    raw["panel"]["store_url"] = resolve_uri(raw["panel"]["store_url"])
    return rlhf_config.validate(raw, f"trigger form of {dag_id}")
