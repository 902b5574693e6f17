"""The MLflow model registry as the gate uses it.

* One registered model per use case (``registry.model_name``), and one for its reward
  models (``<model_name>-reward``).
* A version's source is the model folder in the artifact store (local path or ``s3://``),
  registered only when its MANIFEST.json exists: a half-written folder is never registered.
* Aliases: ``champion`` (what serves) and ``previous`` (the champion it replaced, for a
  one-command rollback); stages are not used.  Decisions and figures go into version tags.
"""

from __future__ import annotations

from rlhf_tasks import tracking
from rlhf_tasks.errors import BadInput

CHAMPION, PREVIOUS = "champion", "previous"


def client(cfg):
    import mlflow

    tracking.setup(cfg)
    return mlflow.MlflowClient()


def reward_model_name(cfg) -> str:
    return f"{cfg.registry.model_name}-reward"


def champion(cfg, name: str | None = None):
    """The version of ``name`` (default: the use case's model) holding alias ``champion``,
    or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client(cfg).get_model_version_by_alias(name or cfg.registry.model_name, CHAMPION)
    except MlflowException:
        return None


def register(cfg, storage, *, name: str, source: str, run_id: str | None, tags: dict,
             description: str = ""):
    """A new version of ``name`` from a complete model folder; returns the ModelVersion.
    A retried step finds the version it registered before (same source, same DAG run)."""
    from mlflow.exceptions import MlflowException

    if not storage.is_complete(source):
        raise BadInput("refusing to register a model folder without its MANIFEST.json "
                       "(incomplete upload)", file=source)
    mlflow_client = client(cfg)
    try:
        mlflow_client.create_registered_model(name)
    except MlflowException:
        pass  # exists
    for version in mlflow_client.search_model_versions(f"name = '{name}'"):
        if version.source == source:
            return version
    clean = {k: str(v) for k, v in tags.items() if v is not None}
    return mlflow_client.create_model_version(name, source=source, run_id=run_id, tags=clean,
                                              description=description)


def promote(cfg, name: str, version: str) -> dict:
    """``champion`` moves to ``version``; the old champion keeps alias ``previous``."""
    mlflow_client = client(cfg)
    old = champion(cfg, name)
    previous = str(old.version) if old is not None else None
    if previous is not None and previous != str(version):
        mlflow_client.set_registered_model_alias(name, PREVIOUS, previous)
    mlflow_client.set_registered_model_alias(name, CHAMPION, str(version))
    mlflow_client.set_model_version_tag(name, str(version), "gate.decision", "promote")
    return {"champion": str(version), "previous": previous}


def reject(cfg, name: str, version: str, reason: str) -> None:
    mlflow_client = client(cfg)
    mlflow_client.set_model_version_tag(name, str(version), "gate.decision", "reject")
    mlflow_client.set_model_version_tag(name, str(version), "gate.reason", reason[:5000])
