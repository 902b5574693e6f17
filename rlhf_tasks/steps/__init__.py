"""The step registry: ``rlhf run STEP`` looks the step up here.

Each entry names a function ``fn(cfg) -> dict`` by module path, imported only when that
step runs, so listing steps (and the CLI's --help) stays light.
"""

from __future__ import annotations

import importlib
from typing import Callable

STEPS: dict[str, str] = {
    "start": "rlhf_tasks.steps.pipeline:start",
    "finish": "rlhf_tasks.steps.pipeline:finish",
    "abort": "rlhf_tasks.steps.pipeline:abort",
    "validate_preference": "rlhf_tasks.steps.validate:validate_preference",
    "validate_prompt": "rlhf_tasks.steps.validate:validate_prompt",
    "validate_eval": "rlhf_tasks.steps.validate:validate_eval",
    "validate_sft": "rlhf_tasks.steps.validate:validate_sft",
    "reward": "rlhf_tasks.steps.reward:reward",
    "sft": "rlhf_tasks.steps.sft:sft",
    "ppo": "rlhf_tasks.steps.ppo:ppo",
    "dpo": "rlhf_tasks.steps.dpo:dpo",
    "evaluate": "rlhf_tasks.steps.evaluate:evaluate",
    "panel_simulate": "rlhf_tasks.steps.panel:panel_simulate",
    "gate": "rlhf_tasks.steps.panel:gate",
    "promote": "rlhf_tasks.steps.panel:promote",
    "smoke_test": "rlhf_tasks.steps.deploy:smoke_test",
}

# The steps that hold an accelerator (Airflow's GPU queue and ``gpu`` pool; on Kubernetes,
# ``nvidia.com/gpu`` limits, the GPU node selector and tolerations), and of those the ones
# that train (on several nodes: a TrainJob; their pool slots count every node's GPUs).
GPU_STEPS = frozenset({"reward", "sft", "ppo", "dpo", "evaluate"})
TRAINING_STEPS = frozenset({"reward", "sft", "ppo", "dpo"})
# the steps that train a run's candidate (``tuning.algorithms``): their outputs, MLflow run
# and compute record go by the candidate's folder
CANDIDATE_STEPS = frozenset({"ppo", "dpo"})


def resolve(name: str) -> Callable:
    from rlhf_tasks.errors import BadInput

    if name not in STEPS:
        raise BadInput(f"unknown step {name!r}; steps: {', '.join(STEPS)}")
    module, _, attr = STEPS[name].partition(":")
    return getattr(importlib.import_module(module), attr)
