"""Pipeline configuration: one pydantic model per step section.

Loaded from YAML or JSON (local path, ``s3://`` or another object store), overridden with ``--set a.b=c``
and, in Airflow, built from the DAG's Params.  An invalid value fails here, before any
GPU time is spent, naming the field and what is allowed.

Light module: pydantic and yaml only (imported by DAG files at parse time).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from rlhf_tasks.errors import BadInput

DatasetKind = Literal["preference", "prompt", "eval", "sft"]
PreferenceFormat = Literal["auto", "pairs", "ranked", "vertex", "chat"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(Section):
    pipeline: str = Field("rlhf_tuning", pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$",
                          description="Pipeline name; the first level of the artifact layout.")
    run_id: str = Field("manual", pattern=r"^[A-Za-z0-9_:+-][A-Za-z0-9_.:+-]*$",
                        description="Pipeline run id (the Airflow run_id); names the run "
                                    "folder, so it may not start with '.'.")
    seed: int = Field(0, ge=0)
    triggered_by: str | None = Field(None, max_length=200,
                                     description="The name of the Airflow user who "
                                                 "triggered the run (set by prepare_run).")
    triggered_by_id: str | None = Field(None, max_length=200,
                                        description="That user's id (set by prepare_run; "
                                                    "never the approver's).")
    approved_by: str | None = Field(None, max_length=200,
                                    description="Set only on the command line of the promote "
                                                "step that the sign_off task runs, from "
                                                "Airflow's record of the approver's answer.")


class ModelSection(Section):
    base_model: str = Field(".rlhf/demo/foundation",
                            description="A Hugging Face causal LM checkpoint (safetensors): a "
                                        "local folder, an s3:// folder or a hub id such as "
                                        "'Qwen/Qwen2.5-0.5B-Instruct' (from the local Hugging "
                                        "Face cache).")
    revision: str | None = Field(None, max_length=200, pattern=r"^[\w./-]+$",
                                 description="Hub revision (branch, tag or commit) of a hub id.")
    tokenizer: str | None = Field(None, description="Tokenizer path; defaults to base_model.")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code in the "
                                                       "checkpoint. Off unless you trust it.")
    hub_repos: list[str] = Field(default_factory=list,
                                 description="Hub ids the trigger form may name as the "
                                             "foundation model (each with a 40-hex commit "
                                             "as model.revision); the base config's own "
                                             "model is the admin's choice.")
    hub_downloads: bool = Field(False, description="Let steps download a hub model missing "
                                                   "from the workers' Hugging Face cache "
                                                   "(off: the cache only).")
    instruction: str = Field("", max_length=2000,
                             description="Instruction for every prompt: the system message "
                                         "in chat format, {instruction} in a template.")
    prompt_format: Literal["auto", "chat", "template"] = Field(
        "auto", description="chat: the tokenizer's chat template; template: prompt_template; "
                            "auto: chat when the tokenizer has a chat template.")
    prompt_template: str = Field("{instruction}\n\n{prompt}\n", min_length=1, max_length=5000,
                                 description="Prompt layout in template format, with "
                                             "{instruction} and {prompt}.")
    response_prefix: str = Field("", max_length=100, description="Text before every response "
                                                                 "in template format.")

    @field_validator("prompt_template")
    @classmethod
    def _template_fields(cls, value: str) -> str:
        from rlhf_tasks.prompting import check_template

        check_template(value)
        return value


class LoraFields(Section):
    """LoRA settings of a training step (rank 0: full tuning)."""

    lora_rank: int = Field(8, ge=0, le=512, description="0 means full fine-tuning.")
    lora_alpha: float | None = Field(None, gt=0, le=4096, description="Scaling numerator; "
                                                                      "None: 2 x rank.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input "
                                                                 "(PPO and reward training "
                                                                 "switch dropout off).")
    lora_target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt (e.g. [q_proj, v_proj]) or "
                                  "all-linear.")


class DataSection(Section):
    preference_uri: str | None = Field(None, description="Human preference dataset.")
    prompt_uri: str | None = Field(None, description="Unlabelled prompts for PPO.")
    eval_uri: str | None = Field(None, description="Evaluation prompts (kept apart from training).")
    sft_uri: str | None = Field(None, description="Prompt + reference response pairs (SFT).")
    preference_format: PreferenceFormat = "auto"
    max_prompt_tokens: int = Field(64, ge=1, le=32768,
                                   description="Prompt sequence length (tokens).")
    max_target_tokens: int = Field(64, ge=1, le=32768,
                                   description="Target (response) sequence length (tokens).")
    max_bad_fraction: float = Field(0.0, ge=0.0, le=1.0,
                                    description="Fail when more than this share of rows is bad.")
    min_preference_rows: int = Field(10, ge=1)
    min_prompt_rows: int = Field(10, ge=1)
    min_eval_rows: int = Field(10, ge=1)
    min_sft_rows: int = Field(10, ge=1)
    max_file_mb: int = Field(1024, ge=1, description="Refuse input files larger than this "
                                                     "(rows are held in memory).")
    expectations_dir: str | None = Field(
        None, description="A data team's own Great Expectations suites (GX suite JSON) in "
                          "<dir>/<kind>/*.json, run after the built-in rules: failing rows "
                          "are quarantined, a failing table expectation fails the table.")


class RewardSection(LoraFields):
    train_steps: int = Field(200, ge=1, le=1_000_000)
    learning_rate_multiplier: float = Field(1.0, gt=0.0, le=100.0,
                                            description="Times the base rate: 1e-3 with LoRA, "
                                                        "2e-5 for full tuning.")
    batch_size: int = Field(16, ge=1, le=4096, description="Preference pairs per step.")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0,
                                 description="Share of prompts held out for pairwise accuracy.")
    use_margin: bool = Field(False, description="Subtract the data's margin inside the loss "
                                                "(Llama 2 style); rows without one use 0.")
    center_rewards_coefficient: float | None = Field(
        0.01, ge=0.0, description="Penalty keeping scores centred on 0 (None: off).")
    norm_samples: int = Field(256, ge=2, le=100_000,
                              description="Reference-policy samples that measure the score's "
                                          "mean and std for normalisation.")
    checkpoint_every: int = Field(50, ge=1, description="Steps between checkpoints.")


class SFTSection(LoraFields):
    enabled: bool = False
    train_steps: int = Field(150, ge=1, le=1_000_000)
    learning_rate_multiplier: float = Field(1.0, gt=0.0, le=100.0,
                                            description="Times the base rate: 1e-3 with LoRA, "
                                                        "2e-5 for full tuning.")
    batch_size: int = Field(32, ge=1, le=4096)
    checkpoint_every: int = Field(50, ge=1)


class DPOSection(LoraFields):
    """Direct preference optimisation (TRL's DPOTrainer) on the validated preference pairs:
    no reward model and no RL loop.  It starts where RL does (``ppo.init_from``: the SFT
    policy when the run trains one), which is also its reference."""

    train_steps: int = Field(100, ge=1, le=1_000_000)
    batch_size: int = Field(16, ge=1, le=4096, description="Preference pairs per step.")
    learning_rate_multiplier: float = Field(1.0, gt=0.0, le=100.0,
                                            description="Times the base rate: 5e-5 with LoRA, "
                                                        "5e-7 for full tuning.")
    beta: float = Field(0.1, gt=0.0, le=10.0, description="Strength of the pull towards "
                                                          "the reference.")
    loss_type: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="sigmoid: DPO; ipo: IPO (squared loss towards 1 / (2 beta)).")
    checkpoint_every: int = Field(50, ge=1)


class DriftBounds(Section):
    """When the run note warns about the RL curves (checked on the last update; None: no
    check).  They move no gate: they say where to look."""

    kl_above: float | None = Field(2.0, gt=0.0, description="KL to the reference per "
                                                            "response.")
    kl_slope_above: float | None = Field(0.25, gt=0.0, description="KL growth per update "
                                                                   "(over the last 5).")
    entropy_below: float | None = Field(0.05, ge=0.0, description="Mean token entropy "
                                                                  "(collapse).")
    clipfrac_above: float | None = Field(0.3, gt=0.0, le=1.0, description="Policy clip "
                                                                          "fraction.")
    length_ratio_above: float | None = Field(2.0, gt=1.0, description="Mean response length "
                                                                      "grew or shrank by "
                                                                      "more than this factor "
                                                                      "since the first update.")


RL_ALGORITHMS = ("ppo", "rloo", "grpo", "dr_grpo")


class PPOSection(LoraFields):
    """The RL step (its section keeps PPO's name; ``algorithm`` chooses the estimator)."""

    algorithm: Literal["ppo", "rloo", "grpo", "dr_grpo"] = Field(
        "ppo", description="ppo (a value model, GAE); rloo (leave-one-out baseline over the "
                           "prompt's samples); grpo (advantages normalised within the "
                           "prompt's group); dr_grpo (GRPO without the std division, the "
                           "loss over a fixed token count: no length bias). The last three "
                           "train no value model.")
    samples_per_prompt: int = Field(1, ge=1, le=256, description="Responses sampled per "
                                                                 "prompt (k); rloo and grpo "
                                                                 "need 2 or more.")
    train_steps: int = Field(32, ge=1, le=1_000_000, description="RL updates (steps).")
    learning_rate_multiplier: float = Field(1.0, gt=0.0, le=100.0,
                                            description="Times the base rate: 3e-4 with LoRA, "
                                                        "1e-6 for full tuning.")
    kl_coef: float = Field(0.05, ge=0.0, le=10.0, description="KL penalty coefficient.")
    kl_estimator: Literal["k1", "k3"] = "k1"
    kl_target: float | None = Field(None, gt=0.0, description="Set: adaptive KL controller "
                                                              "aiming at this KL per response.")
    batch_size: int = Field(32, ge=1, le=4096, description="Episodes (responses) per update: "
                                                           "batch_size / samples_per_prompt "
                                                           "prompts.")
    num_minibatches: int = Field(4, ge=1, le=4096)
    microbatch_size: int = Field(8, ge=1, le=4096)
    ppo_epochs: int = Field(4, ge=1, le=64)
    response_length: int | None = Field(None, ge=1, le=32768,
                                        description="Max new tokens per rollout; default "
                                                    "data.max_target_tokens.")
    temperature: float = Field(0.7, gt=0.0, le=5.0)
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    lam: float = Field(0.95, ge=0.0, le=1.0)
    clip_range: float = Field(0.2, gt=0.0, le=1.0)
    value_clip_range: float = Field(0.2, gt=0.0)
    vf_coef: float = Field(0.1, ge=0.0)
    whiten_rewards: bool = False
    missing_eos_penalty: float = Field(1.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    rollout_cache: Literal["dynamic", "static"] = Field(
        "dynamic", description="KV cache of the rollouts: static preallocates it, and on a "
                               "GPU transformers then compiles the forward (torch.compile; "
                               "the first update pays the compilation).")
    model_layout: Literal["shared", "separate"] = Field(
        "shared", description="shared: value model is an adapter on the reward model; "
                              "separate: a full copy (as TRL does).")
    checkpoint_every: int = Field(10, ge=1)
    merge_adapter: bool = Field(False, description="Also save the policy merged into the base.")
    drift: DriftBounds = DriftBounds()
    init_from: Literal["sft", "foundation"] | None = Field(
        None, description="The policy RL starts from, which is also its KL reference: sft "
                          "(the run's SFT model) or foundation (model.base_model). Default: "
                          "sft when sft.enabled, else foundation.")

    @model_validator(mode="after")
    def _batches_divide(self):
        check_batch_split(self.batch_size, self.num_minibatches, self.microbatch_size)
        k = self.samples_per_prompt
        if self.algorithm != "ppo" and k < 2:
            raise ValueError(f"algorithm {self.algorithm} compares a prompt's samples with "
                             f"each other: samples_per_prompt must be 2 or more, not {k}")
        if self.batch_size % k:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of "
                             f"samples_per_prompt {k} (whole groups per update)")
        return self


def check_batch_split(batch_size: int, num_minibatches: int, microbatch_size: int) -> None:
    """PPO splits a batch into equal minibatches of whole microbatches; ValueError if not.

    Shared by the config (where it becomes a BadInput naming ``ppo``) and ``RLSettings``.
    """
    if batch_size % num_minibatches:
        raise ValueError(f"batch_size {batch_size} must be a multiple of "
                         f"num_minibatches {num_minibatches}")
    minibatch = batch_size // num_minibatches
    if minibatch % min(microbatch_size, minibatch):
        raise ValueError(f"the minibatch ({minibatch} episodes) must be a multiple of "
                         f"microbatch_size {microbatch_size}")


TUNING_ALGORITHMS = (*RL_ALGORITHMS, "dpo")
SINGLE_CANDIDATE = "rlhf"  # the panel's and the registry's label of a run's one candidate


class TuningSection(Section):
    """Which tuned policies the run trains and the panel judges: one candidate (the RL
    step's ``ppo.algorithm``, or the one algorithm named), or a bake-off of several, each
    trained by its own task and all judged in one blinded batch."""

    algorithms: list[Literal["ppo", "rloo", "grpo", "dr_grpo", "dpo"]] = Field(
        default_factory=list, max_length=len(TUNING_ALGORITHMS),
        description="Empty: one candidate, trained by the RL step with ppo.algorithm. One "
                    "name: that algorithm alone. Several (e.g. [ppo, grpo, dpo]): a "
                    "bake-off; the RL ones share the ppo section's settings, dpo reads the "
                    "dpo section, and the gate registers the best that passes.")
    candidate: Literal["ppo", "rloo", "grpo", "dr_grpo", "dpo"] | None = Field(
        None, description="Set by the DAG on the command line of each training task: the "
                          "algorithm that task trains.")

    @field_validator("algorithms")
    @classmethod
    def _each_once(cls, value):
        twice = sorted({a for a in value if value.count(a) > 1})
        if twice:
            raise ValueError(f"each algorithm once: {', '.join(twice)} is named twice")
        return value


@dataclass(frozen=True)
class Candidate:
    """One tuned policy of a run: its label in the review batch, the registry's tags and
    the report (``rlhf`` for a run's one candidate; the algorithm's name in a bake-off),
    its algorithm, the step that trains it and the run folder it is saved in (the step's
    name for one candidate; the algorithm's in a bake-off)."""

    label: str
    algorithm: str
    step: str
    folder: str


def tuning_step(algorithm: str) -> str:
    """The step that trains an algorithm: ``dpo``, or the RL step ``ppo``."""
    return "dpo" if algorithm == "dpo" else "ppo"


class EvaluationSection(Section):
    """How every model under comparison answers the eval prompts (fixed and recorded)."""

    max_new_tokens: int = Field(48, ge=1, le=32768)
    temperature: float = Field(0.7, ge=0.0, le=5.0, description="0 decodes greedily.")
    max_prompts: int | None = Field(None, ge=1, description="Use the first N eval prompts "
                                                             "(None: all).")
    baselines: list[Literal["foundation", "sft"]] = ["foundation", "sft"]
    smoke_prompts: int = Field(5, ge=1, le=1000, description="Eval prompts the deployment "
                                                             "template's smoke test asks the "
                                                             "new champion.")


class SimulatedRaters(Section):
    """The demo's stand-in for people: rubric raters, each with its own noise."""

    raters: int | None = Field(None, ge=1, le=50, description="How many raters; None: "
                                                          "max(5, verdicts_per_item).")
    noise: float = Field(0.08, ge=0.0, le=0.5, description="Mean chance that a rater's "
                                                           "verdict flips.")
    strictness: float = Field(0.05, ge=0.0, le=0.5, description="Mean extra chance that a "
                                                                "rater fails a passing item.")


class PanelSection(Section):
    mode: Literal["simulated", "human"] = Field(
        "simulated", description="simulated: rubric raters judge at once (demo, tests); "
                                 "human: the DAG waits for reviewers.")
    verdicts_per_item: int = Field(3, ge=1, le=15, description="k: verdicts each item needs.")
    idle_cap_seconds: float = Field(600.0, gt=0.0, le=86400.0,
                                    description="A verdict's measured expert time (served to "
                                                "verdict) counts at most this long: idle time "
                                                "beyond it is not counted.")
    quality_bar: str = Field("Pass a response only if it meets the team's quality bar.",
                             min_length=1, max_length=5000,
                             description="What reviewers judge against (shown on every item).")
    pass_rate_threshold: float = Field(0.5, ge=0.0, le=1.0,
                                       description="Minimum expert pass rate to promote.")
    min_lift: float = Field(0.0, ge=-1.0, le=1.0, description="Minimum pass-rate gain over "
                                                              "the champion.")
    significance: float = Field(0.05, gt=0.0, lt=1.0,
                                description="One-sided level of the exact McNemar test on "
                                            "the prompts both models answered.")
    deadline_hours: float = Field(72.0, gt=0.0, le=24 * 90, description="Stop waiting for "
                                                                        "quorum after this.")
    poll_seconds: int = Field(60, ge=1, le=3600, description="How often the waiting gate "
                                                             "checks the store.")
    approver: str | None = Field(None, max_length=200, pattern=r"^[^\s].*$",
                                 description="Airflow user id who must sign off a promotion "
                                             "(None: no sign-off).  Never the user who "
                                             "triggered the run.")
    user_ids: dict[str, str] = Field(
        default_factory=dict, description="Airflow user name -> user id, for auth managers "
                                          "whose ids are not the names (FAB, Keycloak): a run "
                                          "records only its triggering user's name, and a "
                                          "run that needs a sign-off stops when that user's "
                                          "id is not known here.  The simple auth manager "
                                          "needs none (its ids are the names).")
    sign_off_timeout_hours: float = Field(72.0, gt=0.0, le=24 * 90,
                                          description="How long the sign-off waits; no "
                                                      "answer by then means Reject.")
    reviewer_roles: list[str] = Field(default_factory=list, description="Airflow roles "
                                      "whose users are on the panel inside Airflow (besides "
                                      "the user ids on the store's reviewer list).")
    simulated_may_promote: bool = Field(False, description="Let a simulated panel's verdict "
                                        "promote (demos only); otherwise it is a report.")
    reward_rise_flag: float = Field(0.5, gt=0.0, description="Flag possible reward hacking "
                                                             "when the candidate's mean reward "
                                                             "rose by this much (normalised) "
                                                             "over its starting model while "
                                                             "its pass rate did not.")
    max_gap_to_reference: float | None = Field(
        None, ge=0.0, le=1.0, description="With expert-written reference answers in the eval "
                                          "data: the candidate's pass rate may trail theirs "
                                          "by at most this (None: no such rule).")
    sequential: bool = Field(False, description="A sequential panel: serve the items the "
                                                "gate's comparison needs, in an order fixed in "
                                                "advance, and stop as soon as an anytime-valid "
                                                "test settles it either way (promote-worthy, "
                                                "or the policy out of reach); the type-I "
                                                "error stays at most `significance`.  Other "
                                                "models of the batch are not judged.")
    sequential_min_prompts: int = Field(20, ge=1, le=100000,
                                        description="A sequential panel stops early only "
                                                    "after this many prompts are decided.")
    review_url: str | None = Field(None, pattern=r"^https?://", max_length=2048,
                                   description="The review page the notifications link to "
                                               "(the standalone app); default: the page "
                                               "inside Airflow.")
    simulated: SimulatedRaters = SimulatedRaters()
    store_url: str = Field("sqlite:///.rlhf/panel.db", description="SQLAlchemy URL of the "
                                                                   "verdict store.")

    @property
    def simulated_raters(self) -> int:
        return self.simulated.raters or max(5, self.verdicts_per_item)

    @model_validator(mode="after")
    def _enough_raters(self):
        if self.mode == "simulated" and self.simulated_raters < self.verdicts_per_item:
            raise ValueError(f"simulated.raters ({self.simulated.raters}) must be at least "
                             f"verdicts_per_item ({self.verdicts_per_item}): a reviewer "
                             "judges an item once")
        return self


class RegistrySection(Section):
    model_name: str = Field("rlhf-policy", pattern=r"^[A-Za-z0-9_.-]+$",
                            description="Registered model of the tuned policy; its reward "
                                        "models are '<model_name>-reward'.")


class StorageSection(Section):
    artifact_root: str = Field(".rlhf/artifacts", description="Local folder, s3://bucket/prefix, "
                               "or gs://, abfs:// (fsspec; gcsfs or adlfs installed).")
    allowed_roots: list[str] = Field(default_factory=list,
                                     description="Extra roots that inputs may be read from.")
    s3_endpoint_url: str | None = Field(None, description="For MinIO or another S3 API.")
    s3_region: str | None = None
    multipart_threshold_mb: int = Field(8, ge=5, le=5120)
    max_attempts: int = Field(5, ge=1, le=20)


class TrackingSection(Section):
    tracking_uri: str = "sqlite:///.rlhf/mlflow.db"
    experiment: str = "rlhf-tuning"
    artifact_location: str | None = Field(None, description="Default: .rlhf/mlartifacts.")
    ui_url: str | None = Field(None, pattern=r"^https?://", max_length=2048,
                               description="The MLflow UI that task links point at; default: "
                                           "the tracking URI when it is a server, else "
                                           "$RLHF_MLFLOW_UI_URL.")
    panel_views: bool = Field(True, description="After the close, the gate copies the "
                              "panel into MLflow's GenAI views: an evaluation run per model, "
                              "a trace per answer, every verdict as feedback, the eval set "
                              "as an evaluation dataset (panel/mlflow_views.py).")
    parent_run_id: str | None = None


class KubernetesSection(Section):
    """How heavy steps run as pods (``compute.backend: kubernetes``)."""

    image: str = Field("ghcr.io/rlhf-airflow/trainer:0.1.0",
                       description="Trainer image (docker/trainer.Dockerfile).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    namespace: str = Field("rlhf", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    service_account: str | None = "rlhf-trainer"
    kubernetes_conn_id: str | None = Field(None, description="Airflow connection; None: "
                                                             "in-cluster or kubeconfig.")
    node_selector: dict[str, str] = Field(
        default_factory=lambda: {"nvidia.com/gpu.present": "true"},
        description="Node labels for GPU steps.")
    tolerations: list[dict[str, str]] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists",
                                  "effect": "NoSchedule"}],
        description="Tolerations for GPU steps (GPU node pools are usually tainted).")
    env_secrets: list[str] = Field(
        default_factory=lambda: ["rlhf-s3", "rlhf-mlflow"],
        description="Kubernetes secrets whose keys become the pod's environment "
                    "(AWS_*, MLFLOW_TRACKING_*): credentials never pass through Params.")
    cpu: str = "4"
    memory: str = Field("32Gi", description="Memory of a training step's pod (each node's, "
                                            "for a TrainJob), with or without GPUs.")
    cpu_step_memory: str = Field("8Gi", description="Memory of the other steps' pods "
                                                    "(validation, bookkeeping).")
    shm_size: str = Field("16Gi", description="Memory-backed /dev/shm (DataLoader, NCCL).")
    on_finish_action: Literal["delete_pod", "delete_succeeded_pod", "keep_pod"] = \
        "delete_succeeded_pod"
    startup_timeout_seconds: int = Field(1800, ge=60, description="Waiting for a GPU node "
                                                                  "to scale up counts here.")
    logging_interval: int = Field(60, ge=5, description="Seconds between log fetches while "
                                                        "the task is deferred.")
    training_runtime: str = Field(
        "rlhf-torch-distributed", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Kubeflow Trainer ClusterTrainingRuntime of multi-node steps "
                    "(docker/k8s/trainingruntime.yaml: torch, the env_secrets, /dev/shm).")


class ComputeSection(Section):
    backend: Literal["local", "kubernetes"] = "local"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_gpus: int = Field(1, ge=0, le=64, description="GPUs per training pod; more than one "
                                                      "runs `accelerate launch` data-parallel.")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="Several processes of a training step: ddp keeps a whole copy "
                           "of every model per process; fsdp shards the models (FSDP2), each "
                           "process holding 1/N of every weight: for models bigger than one "
                           "GPU (reward and sft shard through accelerate, on GPUs only).")
    num_nodes: int = Field(1, ge=1, le=128, description="Machines per training step (reward, "
                                                        "sft, ppo); more than one runs the "
                                                        "step as a Kubeflow Trainer TrainJob "
                                                        "(compute.backend: kubernetes).")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Weights and autocast precision; trainable weights keep fp32 "
                            "master copies. auto: bf16 on a GPU that has it and on a "
                            "CPU with AMX bf16 tiles, else fp32 (the choice is logged "
                            "and tagged on each training step's MLflow run).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the "
                                                            "backward pass: less memory, "
                                                            "about a third more compute.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="auto: flash_attention_2 on a GPU where flash-attn is installed, "
                            "else sdpa.")
    step_timeout_hours: float = Field(24.0, gt=0.0, le=24 * 30,
                                      description="execution_timeout of every step task "
                                                  "(read from the base config when the DAG "
                                                  "is parsed).")
    step_timeouts_hours: dict[str, float] = Field(
        default_factory=dict, description="Per step, e.g. {ppo: 72}: overrides "
                                          "step_timeout_hours.")
    kubernetes: KubernetesSection = KubernetesSection()

    def step_timeout(self, step: str) -> float:
        return self.step_timeouts_hours.get(step, self.step_timeout_hours)

    @model_validator(mode="after")
    def _nodes_need_kubernetes(self):
        if self.num_nodes > 1 and self.backend != "kubernetes":
            raise ValueError("num_nodes > 1 runs the training steps as Kubeflow TrainJobs: "
                             "set compute.backend: kubernetes")
        return self


class ScheduleSection(Section):
    """When the DAG retrains by itself (read from the base config at DAG parse time)."""

    cron: str | None = Field(None, description="Retrain on this cron schedule (UTC), "
                                               "e.g. '0 3 * * 1' for Mondays at 03:00.")
    on_new_preferences: bool = Field(False, description="Also retrain when the preference "
                                                        "dataset's Asset gets a new event.")
    run_deadline_hours: float | None = Field(None, gt=0.0, le=24 * 90,
                                             description="Alert (a notification) when a run "
                                                         "is still going this long after it "
                                                         "was queued; None: no alert.")

    @model_validator(mode="after")
    def _cron_is_valid(self):
        if self.cron is not None:
            from croniter import croniter

            if not croniter.is_valid(self.cron):
                raise ValueError(f"'{self.cron}' is not a cron expression (five fields: "
                                 "minute hour day-of-month month day-of-week)")
        return self


FP16_REFUSED = ("compute.dtype 'fp16': the RL loop has no loss scaling, so small fp16 gradients "
                "would underflow to zero; use bf16 (same speed on GPUs since Ampere, and on "
                "CPUs with AMX) or fp32")


class CostSection(Section):
    """The admin's prices for the benefit-and-cost table (``panel/cost.py``); a price left
    unset leaves the figures that need it unpriced."""

    currency: str = Field("USD", pattern=r"^[A-Z]{3}$", description="ISO 4217 code.")
    gpu_hour: float | None = Field(None, ge=0.0, description="One GPU for one hour.")
    cpu_hour: float | None = Field(None, ge=0.0, description="One CPU core for one hour.")
    expert_hour: float | None = Field(None, ge=0.0, description="One expert for one hour.")
    reference_minutes: float | None = Field(None, gt=0.0, le=1440.0,
                                            description="Minutes an expert takes to write "
                                                        "one answer.")
    labelling_per_pair: float | None = Field(None, ge=0.0, description="Declared cost of "
                                             "one labelled preference pair.")


class PipelineConfig(Section):
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    reward: RewardSection = RewardSection()
    sft: SFTSection = SFTSection()
    ppo: PPOSection = PPOSection()
    dpo: DPOSection = DPOSection()
    tuning: TuningSection = TuningSection()
    evaluation: EvaluationSection = EvaluationSection()
    panel: PanelSection = PanelSection()
    registry: RegistrySection = RegistrySection()
    storage: StorageSection = StorageSection()
    tracking: TrackingSection = TrackingSection()
    compute: ComputeSection = ComputeSection()
    schedule: ScheduleSection = ScheduleSection()
    cost: CostSection = CostSection()

    @model_validator(mode="after")
    def _no_unscaled_fp16(self):
        if self.compute.dtype == "fp16":
            raise ValueError(FP16_REFUSED)
        return self

    @model_validator(mode="after")
    def _rl_starts_from_a_trained_sft(self):
        if self.ppo.init_from == "sft" and not self.sft.enabled:
            raise ValueError("ppo.init_from is 'sft' but sft.enabled is false: enable the SFT "
                             "step or start from 'foundation'")
        return self

    @model_validator(mode="after")
    def _candidates_train(self):
        names = self.tuning.algorithms
        for algorithm in names:
            if algorithm in RL_ALGORITHMS and algorithm != self.ppo.algorithm:
                try:  # the RL candidates share the ppo section: each must be valid with it
                    PPOSection.model_validate({**self.ppo.model_dump(), "algorithm": algorithm})
                except ValidationError as exc:
                    reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
                    raise ValueError(f"tuning.algorithms: {algorithm} with the ppo section's "
                                     f"settings: {reason}") from None
        chosen = self.tuning.candidate
        if chosen is not None and chosen not in (names or [self.ppo.algorithm]):
            raise ValueError(f"tuning.candidate {chosen} is not one of this run's candidates "
                             f"({', '.join(names) or self.ppo.algorithm})")
        return self

    @property
    def candidates(self) -> list[Candidate]:
        """The run's tuned policies (``tuning.algorithms``), in the order named."""
        names = self.tuning.algorithms or [self.ppo.algorithm]
        if len(names) == 1:
            step = tuning_step(names[0])
            return [Candidate(SINGLE_CANDIDATE, names[0], step, step)]
        return [Candidate(a, a, tuning_step(a), a) for a in names]

    def candidate_for(self, step: str) -> Candidate:
        """The candidate a run of the training step ``step`` trains: ``tuning.candidate``
        (a bake-off's task), else the run's one candidate of that step; a step run by hand
        that trains none of them saves under its own name."""
        found = [c for c in self.candidates if c.step == step]
        chosen = self.tuning.candidate
        if chosen is not None:
            found = [c for c in found if c.algorithm == chosen]
            if not found:
                raise BadInput(f"tuning.candidate {chosen} is trained by the "
                               f"{tuning_step(chosen)} step, not by {step}",
                               field="tuning.candidate")
        if len(found) > 1:
            raise BadInput(f"this run's bake-off trains {len(found)} candidates with the "
                           f"{step} step ({', '.join(c.algorithm for c in found)}): name "
                           "one with tuning.candidate", field="tuning.candidate")
        if found:
            return found[0]
        return Candidate(SINGLE_CANDIDATE, "dpo" if step == "dpo" else self.ppo.algorithm,
                         step, step)

    def for_candidate(self, candidate: Candidate) -> "PipelineConfig":
        """This config as the candidate's training step reads it (an RL candidate's
        algorithm in ``ppo.algorithm``)."""
        if candidate.step != "ppo" or candidate.algorithm == self.ppo.algorithm:
            return self
        raw = self.dump()
        raw["ppo"]["algorithm"] = candidate.algorithm
        return PipelineConfig.model_validate(raw)

    @property
    def rl_start(self) -> str:
        """Where RL starts: ``sft`` or ``foundation`` (``ppo.init_from`` resolved)."""
        return self.ppo.init_from or ("sft" if self.sft.enabled else "foundation")

    def run_uri(self) -> str:
        """``<artifact_root>/<pipeline>/<run_id>``: the run's folder."""
        return "/".join([self.storage.artifact_root.rstrip("/"), self.run.pipeline,
                         self.run.run_id])

    def step_uri(self, step: str, name: str = "") -> str:
        """``<artifact_root>/<pipeline>/<run_id>/<step>/<name>``."""
        return "/".join([self.run_uri(), step] + ([name] if name else []))

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _describe(error: dict[str, Any]) -> str:
    field = ".".join(str(p) for p in error["loc"])
    got = error.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    if error["type"] == "extra_forbidden":
        section = PipelineConfig
        for part in error["loc"][:-1]:
            section = section.model_fields[part].annotation
        allowed = ", ".join(sorted(section.model_fields))
        return f"config field '{field}': unknown field; allowed here: {allowed}"
    if not field:  # a rule across sections
        return error["msg"].removeprefix("Value error, ")
    return f"config field '{field}': {error['msg']}{shown}"


def validate(raw: dict[str, Any], source: str = "config") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise BadInput(f"invalid configuration in {source}: {problems}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], value); the value is parsed as YAML (numbers, bools, lists)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise BadInput(f"--set expects key=value, got {item!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return [p for p in key.strip().split(".")], value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise BadInput(f"--set {item}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def parse_text(text: str, source: str) -> dict[str, Any]:
    try:
        raw = json.loads(text) if source.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        message = " ".join(str(exc).split())  # one line
        raise BadInput(f"cannot parse config {source}: {message}") from None
    except RecursionError:
        raise BadInput(f"cannot parse config {source}: nested too deeply") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BadInput(f"config {source} must be a mapping of sections, got {type(raw).__name__}")
    return raw


def read_source(source: str) -> str:
    """The text of a config file (local, s3:// or another object store); BadInput when it is
    missing or not UTF-8."""
    from rlhf_tasks.storage import is_remote

    if is_remote(source):
        from rlhf_tasks.storage import read_text_unchecked

        return read_text_unchecked(source)
    path = Path(source)
    if not path.is_file():
        raise BadInput(f"config file not found: {source}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"config file {source} is not UTF-8 text ({exc.reason} at byte "
                       f"{exc.start})") from None


def text_digest(text: str) -> str:
    """The sha256 a run's config is pinned by (``prepare_run`` records it; steps check it)."""
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load(source: str | None = None, overrides: list[str] | None = None, *,
         sha256: str | None = None) -> PipelineConfig:
    """Load a config file (local or s3://), apply ``--set`` overrides, validate.  With
    ``sha256``, the file must be exactly the one that digest pins (a run's config, as
    ``prepare_run`` wrote it): anything else is BadInput, read no further."""
    raw: dict[str, Any] = {}
    if sha256 is not None and not source:
        raise BadInput("a config digest was given without a config file")
    if source:
        text = read_source(source)
        if sha256 is not None and text_digest(text) != sha256.lower():
            raise BadInput(f"config {source} is not the file this run was prepared with "
                           f"(sha256 {text_digest(text)[:12]}..., expected {sha256[:12]}...): "
                           "it changed after prepare_run wrote it", file=source)
        raw = parse_text(text, source)
    raw = apply_overrides(raw, overrides or [])
    return validate(raw, source or "--set overrides")
