"""Which config a task of a run reads: derived from the run's identity, never handed over.

``prepare_run`` writes the run's config to
``<base artifact_root>/<dag_id>/<run folder>/config.json`` and records its sha256 in its
XCom.  Every later task derives that location itself from the admin's base config
(``$RLHF_BASE_CONFIG``, whose ``storage`` section is the run's: the form and ``config_file``
cannot change it), the DAG id and the run id, and hands the step the digest to check.

An XCom is not evidence: Airflow lets a user change one (``PATCH .../xcomEntries/{key}``)
with the role that triggers runs.  So the XCom's ``config_uri`` must equal the derived
location, or the task fails before anything reads the other file; and the file must hash
to the digest, or the step stops (exit 2) before it acts on it.  Rewriting the run's
config then takes both write access to the artifact store and to the XCom.
"""

from __future__ import annotations

import os
import re

from airflow.sdk.exceptions import AirflowFailException

# the operators' default config_uri: "the run's own config", resolved at run time
RUN_CONFIG = "@run"
PREPARE_TASK = "prepare_run"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def runtime_base_config():
    """The admin's base config as a task reads it (local or s3://; defaults when unset)."""
    from rlhf_tasks import config as rlhf_config

    path = os.environ.get("RLHF_BASE_CONFIG", "").strip()
    return rlhf_config.load(path) if path else rlhf_config.PipelineConfig()


def run_config_uri(dag_id: str, run_id: str, base=None) -> str:
    """``<artifact_root>/<dag_id>/<run folder>/config.json`` under the base config's root."""
    from rlhf_airflow.params import safe_run_id
    from rlhf_tasks.storage import Storage

    base = base if base is not None else runtime_base_config()
    root = Storage.normalise(base.storage.artifact_root).rstrip("/")
    return "/".join([root, dag_id, safe_run_id(run_id), "config.json"])


def resolve(context) -> tuple[str, str]:
    """(config URI, sha256) of this task's run: derived, and checked against what
    ``prepare_run`` recorded; AirflowFailException (no retry) when they disagree."""
    from rlhf_tasks.errors import BadInput

    dag_id, run_id = context["dag"].dag_id, context["run_id"]
    try:
        uri = run_config_uri(dag_id, run_id)
    except BadInput as exc:
        raise AirflowFailException(f"cannot read the base config: {exc}") from None
    prepared = context["ti"].xcom_pull(task_ids=PREPARE_TASK) or {}
    recorded = prepared.get("config_uri") if isinstance(prepared, dict) else None
    if recorded != uri:
        raise AirflowFailException(
            f"{PREPARE_TASK}'s XCom names the config {recorded!r}, but this run's config is "
            f"{uri}: the XCom was changed after {PREPARE_TASK} wrote it; nothing was read "
            "from it")
    digest = str(prepared.get("config_sha256") or "")
    if not _SHA256.match(digest):
        raise AirflowFailException(f"{PREPARE_TASK}'s XCom has no valid config_sha256: the "
                                   "run's config cannot be checked, so it is not used")
    return uri, digest


def load_run_config(context):
    """The run's config itself, derived, digest-checked (AirflowFailException otherwise)."""
    from rlhf_tasks import config
    from rlhf_tasks.errors import BadInput

    uri, digest = resolve(context)
    try:
        return config.load(uri, sha256=digest)
    except BadInput as exc:
        raise AirflowFailException(str(exc)) from None
