"""The ``smoke_test`` step of the deployment template (``rlhf_deploy_champion``): load the
registry's current champion as an MLflow model, the way a serving system would, and have
it answer a few of the eval prompts of the run that produced it.

What it trusts: the admin's config (the registry, the artifact store) and the registry's
``champion`` alias.  Nothing from the Asset event that triggered it is read here, so a
forged event can make it test the champion again, never load something else.

Fails (exit 1) when the champion cannot be loaded or answers empty; exit 2 when there is
no champion.  Result: the version tested, per-prompt latency, the answers' lengths.
"""

from __future__ import annotations

import logging
import time

from rlhf_tasks import registry, tracking, training
from rlhf_tasks.errors import BadInput
from rlhf_tasks.storage import Storage

log = logging.getLogger(__name__)


def smoke_test(cfg) -> dict:
    import mlflow

    champ = registry.champion(cfg)
    if champ is None:
        raise BadInput(f"model {cfg.registry.model_name!r} has no champion to deploy",
                       field="registry.model_name")
    # the eval prompts of the run that produced the champion (its tags name the run)
    source = cfg.model_copy(update={"run": cfg.run.model_copy(update={
        "pipeline": champ.tags.get("airflow.dag_id", cfg.run.pipeline),
        "run_id": champ.tags.get("airflow.run_id", cfg.run.run_id)})})
    storage = Storage.from_config(cfg)
    prompts = list(training.read_canonical(source, storage, "eval")["prompt"])
    prompts = prompts[:cfg.evaluation.smoke_prompts]
    tracking.setup(cfg)
    uri = f"models:/{cfg.registry.model_name}/{champ.version}"
    started = time.perf_counter()
    model = mlflow.pyfunc.load_model(uri)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    answers = list(model.predict(prompts, params={"temperature": 0.0}))
    answer_s = (time.perf_counter() - started) / max(len(prompts), 1)
    empty = [p for p, a in zip(prompts, answers) if not isinstance(a, str) or not a.strip()]
    for prompt, answer in zip(prompts[:3], answers):
        log.info("champion v%s\n  prompt: %s\n  answer: %s", champ.version, prompt[:200],
                 str(answer)[:200])
    if len(answers) != len(prompts) or empty:
        raise RuntimeError(f"champion {uri} answered {len(prompts) - len(empty)} of "
                           f"{len(prompts)} prompts (empty for: {empty[:3]})")
    return {"model_uri": uri, "version": champ.version, "prompts": len(prompts),
            "load_seconds": round(load_s, 2), "seconds_per_answer": round(answer_s, 3),
            "answer_chars_mean": round(sum(map(len, answers)) / len(answers), 1)}
