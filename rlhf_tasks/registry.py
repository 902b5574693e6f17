"""The MLflow model registry as the gate uses it.

* One registered model per use case (``registry.model_name``), and one for its reward
  models (``<model_name>-reward``).
* A version's source is the model folder in the artifact store (local path or ``s3://``),
  registered only when its MANIFEST.json exists: a half-written folder is never registered.
* Aliases: ``champion`` (what serves) and ``previous`` (the champion it replaced, for a
  one-command rollback); stages are not used.  Decisions and figures go into version tags.
* Only "alias not found" (or "model not found") means "no champion"; any other registry
  error (a timeout, a 5xx) is a :class:`RegistryFault`, exit 1, retried.
* :func:`move_aliases` moves several aliases as one: all of them, or on a failure none
  (those already moved are put back), and a retry after a success changes nothing.
"""

from __future__ import annotations

from rlhf_tasks import tracking
from rlhf_tasks.errors import BadInput

CHAMPION, PREVIOUS = "champion", "previous"


class RegistryFault(Exception):
    """The registry could not answer (exit 1: Airflow retries)."""


class ChampionChanged(BadInput):
    """The champion is no longer the version the gate compared against."""


def _not_found(exc) -> bool:
    code = getattr(exc, "error_code", "")
    message = str(exc)
    return code == "RESOURCE_DOES_NOT_EXIST" or (
        code == "INVALID_PARAMETER_VALUE" and "alias" in message and "not found" in message)


def client(cfg):
    import mlflow

    tracking.setup(cfg)
    return mlflow.MlflowClient()


def reward_model_name(cfg) -> str:
    return f"{cfg.registry.model_name}-reward"


def champion(cfg, name: str | None = None):
    """The version of ``name`` (default: the use case's model) holding alias ``champion``,
    or None when there is none (a registry fault raises RegistryFault)."""
    return alias_version(client(cfg), name or cfg.registry.model_name, CHAMPION)


def alias_version(mlflow_client, name: str, alias: str):
    """The version holding ``alias``, None when the alias (or the model) does not exist;
    any other error is a RegistryFault."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if _not_found(exc):
            return None
        raise RegistryFault(f"registry error reading alias {alias!r} of {name!r}: "
                            f"{exc}") from exc
    except OSError as exc:  # connection refused or reset, timeouts
        raise RegistryFault(f"registry unreachable reading alias {alias!r} of {name!r}: "
                            f"{exc}") from exc


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
    logged = logged_model(cfg, name=name, source=source, run_id=run_id, tags=clean)
    return mlflow_client.create_model_version(name, source=source, run_id=run_id, tags=clean,
                                              description=description,
                                              model_id=logged.model_id)


def logged_model(cfg, *, name: str, source: str, run_id: str | None, tags: dict):
    """The version's MLflow LoggedModel (an external model: its weights stay in the
    artifact store at ``source``), so the Models view lists it beside the run that trained
    it, and evaluations link to it."""
    import mlflow

    experiment_id = tracking.setup(cfg)
    return mlflow.create_external_model(
        name=name, source_run_id=run_id, experiment_id=experiment_id,
        model_type="reward-model" if name == reward_model_name(cfg) else "policy",
        tags={**{k: v for k, v in tags.items() if len(v) <= 5000}, "source": source})


def _alias(mlflow_client, name: str, alias: str) -> str | None:
    """The version number ``alias`` points at, or None."""
    found = alias_version(mlflow_client, name, alias)
    return str(found.version) if found is not None else None


def _champion_moves(name: str, version: str, current: str | None) -> list:
    """``champion`` to ``version``, and ``previous`` to the champion it replaces."""
    moves = [(name, PREVIOUS, current)] if current not in (None, version) else []
    return moves + [(name, CHAMPION, version)]


def move_aliases(cfg, moves: list[tuple[str, str, str | None]]) -> None:
    """Set each ``(model name, alias, version)`` (version None: delete the alias), all or
    none: when one move fails, the moves already made are undone, then the error is
    raised as a RegistryFault (the task retries; a retry finds the same starting point).
    """
    mlflow_client = client(cfg)
    before = [(name, alias, _alias(mlflow_client, name, alias)) for name, alias, _ in moves]

    def put(name, alias, version):
        if version is None:
            try:
                mlflow_client.delete_registered_model_alias(name, alias)
            except Exception as exc:  # noqa: BLE001 - deleting an absent alias is done
                if not _not_found(exc):
                    raise
        else:
            mlflow_client.set_registered_model_alias(name, alias, version)

    done = []
    try:
        for (name, alias, version), (_, _, old) in zip(moves, before):
            if version == old:
                continue
            put(name, alias, version)
            done.append((name, alias, old))
    except Exception as exc:
        undo_errors = []
        for name, alias, old in reversed(done):
            try:
                put(name, alias, old)
            except Exception as undo:  # noqa: BLE001 - reported with the first error
                undo_errors.append(f"{name}@{alias}: {undo}")
        detail = ("; could not restore " + "; ".join(undo_errors)) if undo_errors else \
            "; aliases moved so far were restored"
        raise RegistryFault(f"moving aliases failed at {exc}{detail}") from exc


def _journal_moves(record: dict, name: str, version: str,
                   reward: tuple[str, str] | None) -> list[tuple[str, str, str | None]]:
    """The journal's moves, if each is one this promotion could make (the journal lies in
    the artifact store: a forged one moves nothing else)."""
    allowed_champions = {(name, version)} | ({(reward[0], str(reward[1]))} if reward else set())
    names = {n for n, _ in allowed_champions}
    moves = []
    for move in record.get("moves", []):
        model, alias, target = move
        if alias == CHAMPION and (model, target) in allowed_champions:
            moves.append((model, alias, target))
        elif alias == PREVIOUS and model in names:
            moves.append((model, alias, target))
        else:
            raise RegistryFault(f"the alias journal holds a move this promotion would not "
                                f"make: {move}")
    return moves


def promote(cfg, name: str, version: str, *, expected_champion: str | None,
            reward: tuple[str, str] | None = None, journal=None) -> dict:
    """``champion`` moves to ``version`` and the old champion keeps ``previous`` (and the
    same for the reward model, when given), as one move.  ``expected_champion`` is the
    version the gate compared against (None: there was none): when the champion is now
    another version, nothing moves (ChampionChanged, exit 2: decide again).

    ``journal``: ``(storage, uri)`` of the run's alias journal.  The planned moves are
    written there before the first one ("pending") and marked "done" after the last, so a
    retry, or the next try after a process killed between two moves, completes exactly the
    moves that were planned (the policy's and the reward model's together) instead of
    finding the policy's champion moved and stopping.  Without a journal, a retry after a
    success finds ``version`` already champion and changes nothing.  MLflow has no
    compare-and-set for aliases: the champion is read again after the moves and a
    concurrent promotion is reported (RegistryFault) rather than silently lost."""
    mlflow_client = client(cfg)
    version = str(version)
    record = None
    if journal is not None:
        storage, uri = journal
        record = storage.read_json(uri) if storage.exists(uri) else None
    if record is not None:
        moves = _journal_moves(record, name, version, reward)
        if record.get("status") != "done":
            current = _alias(mlflow_client, name, CHAMPION)
            if current not in (record.get("previous"), version):
                raise ChampionChanged(
                    f"the champion of {name} is version {current} now, neither the one this "
                    f"run replaces ({record.get('previous')}) nor its own ({version}): run "
                    "the pipeline again", field="registry.champion")
            move_aliases(cfg, moves)
            storage.write_json(uri, {**record, "status": "done"})
        mlflow_client.set_model_version_tag(name, version, "gate.decision", "promote")
        return {"champion": version, "previous": record.get("previous")}
    current = _alias(mlflow_client, name, CHAMPION)
    if current == version:  # a retry after the moves went through
        return {"champion": version, "previous": _alias(mlflow_client, name, PREVIOUS)}
    if current != expected_champion:
        raise ChampionChanged(
            f"the champion of {name} is version {current} now, not version "
            f"{expected_champion} that the gate compared against: run the pipeline again",
            field="registry.champion")
    moves = _champion_moves(name, version, current)
    if reward is not None:
        reward_name, reward_version = reward
        moves += _champion_moves(reward_name, str(reward_version),
                                 _alias(mlflow_client, reward_name, CHAMPION))
    if journal is not None:
        storage.write_json(uri, {"status": "pending", "moves": [list(m) for m in moves],
                                 "previous": current})
    move_aliases(cfg, moves)
    if journal is not None:
        storage.write_json(uri, {"status": "done", "moves": [list(m) for m in moves],
                                 "previous": current})
    now = _alias(mlflow_client, name, CHAMPION)
    if now != version:
        raise RegistryFault(f"champion of {name} is version {now} right after this run moved "
                            f"it to {version}: another promotion ran at the same time")
    mlflow_client.set_model_version_tag(name, version, "gate.decision", "promote")
    return {"champion": version, "previous": current}


def reject(cfg, name: str, version: str, reason: str, decision: str = "reject") -> None:
    mlflow_client = client(cfg)
    mlflow_client.set_model_version_tag(name, str(version), "gate.decision", decision)
    mlflow_client.set_model_version_tag(name, str(version), "gate.reason", reason[:5000])
