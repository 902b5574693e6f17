"""The ``validate`` steps: one per dataset kind (preference, prompt, eval).

Outputs under ``<artifact_root>/<pipeline>/<run_id>/validate_<kind>/``:
``canonical.parquet`` (only when the data may be used), ``quarantine.jsonl``,
``report.json``, ``data_docs/`` (Great Expectations Data Docs), ``MANIFEST.json`` (last).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from rlhf_tasks import models, tracking
from rlhf_tasks.data import validation
from rlhf_tasks.errors import BadInput
from rlhf_tasks.storage import Storage, join

log = logging.getLogger(__name__)
URI_FIELD = {"preference": "preference_uri", "prompt": "prompt_uri", "eval": "eval_uri",
             "sft": "sft_uri"}


def validate_kind(cfg, kind: str, uri: str | None = None, fmt: str | None = None,
                  storage: Storage | None = None) -> dict:
    uri = uri or getattr(cfg.data, URI_FIELD[kind])
    if not uri:
        raise BadInput(f"no dataset to validate: set data.{URI_FIELD[kind]}",
                       field=f"data.{URI_FIELD[kind]}")
    storage = storage or Storage.from_config(cfg)
    fmt = fmt or (cfg.data.preference_format if kind == "preference" else "auto")
    step = f"validate_{kind}"
    out_uri = cfg.step_uri(step)
    with tracking.step_run(cfg, step, tags={"data.kind": kind, "data.source": uri}) as run_id, \
            tempfile.TemporaryDirectory(prefix="rlhf-validate-") as tmp:
        out_dir = Path(tmp) / "out"
        eval_keys = None
        if kind != "eval" and cfg.data.eval_uri:
            eval_keys = validation.read_prompt_keys(storage, cfg.data.eval_uri,
                                                    cfg.data.max_file_mb)
        outcome = validation.validate_dataset(
            storage=storage, uri=uri, kind=kind, fmt=fmt,
            load_tokenizer=lambda: models.load_tokenizer(cfg, storage),
            data_cfg=cfg.data, eval_keys=eval_keys, docs_dir=out_dir / "data_docs")
        validation.write_outputs(outcome, out_dir)
        problem = None
        try:
            validation.check_outcome(outcome, cfg.data.max_bad_fraction)
            validation.write_canonical(outcome, out_dir)
        except BadInput as exc:
            problem = exc
        manifest = storage.put_dir(out_dir, out_uri, extra={
            "status": "rejected" if problem else "ok", "digest": outcome.digest,
            "kind": kind, "source": uri})

        import mlflow

        summary = outcome.summary()
        tracking.log_metrics("data", {
            f"{kind}/rows_read": outcome.rows_read, f"{kind}/rows_kept": outcome.rows_kept,
            f"{kind}/rows_quarantined": len(outcome.quarantine),
            f"{kind}/bad_fraction": outcome.bad_fraction,
            **{f"{kind}/quarantined/{_slug(r)}": n for r, n in outcome.reasons().items()},
        })
        mlflow.set_tags({f"data.{kind}.format": outcome.fmt, f"data.{kind}.digest": outcome.digest,
                         f"data.{kind}.status": "rejected" if problem else "ok"})
        mlflow.log_artifacts(str(out_dir), artifact_path=step)
        # the Data Docs, linked from the run: its tags and its description
        docs = mlflow.get_artifact_uri(f"{step}/data_docs/index.html")
        stored = join(out_uri, "data_docs", "index.html")
        mlflow.set_tags({"data_docs": docs, "data_docs.stored": stored,
                         "mlflow.note.content": (
                             f"Great Expectations Data Docs of the {kind} data: "
                             f"artifact `{step}/data_docs/index.html` ({docs}); with the run's "
                             f"outputs at {stored}. The pages render offline. Suites as GX "
                             f"JSON: `{step}/expectations/`.")})
        if problem is None:
            tracking.log_dataset(outcome.frame, name=f"{kind}-canonical",
                                 source=join(out_uri, "canonical.parquet"),
                                 digest=outcome.digest,
                                 context="eval" if kind == "eval" else "training")
        log.info("validated %s: %s", kind, summary)
        if problem is not None:
            raise problem
    return {
        "kind": kind, "canonical_uri": join(out_uri, "canonical.parquet"),
        "quarantine_uri": join(out_uri, "quarantine.jsonl"),
        "data_docs_uri": join(out_uri, "data_docs", "index.html"),
        "digest": outcome.digest, "rows_read": outcome.rows_read,
        "rows_kept": outcome.rows_kept, "rows_quarantined": len(outcome.quarantine),
        "format": outcome.fmt, "mlflow_run_id": run_id, "files": len(manifest["files"]),
    }


def _slug(reason: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "_", reason.lower()).strip("_")[:60]


def validate_preference(cfg) -> dict:
    return validate_kind(cfg, "preference")


def validate_prompt(cfg) -> dict:
    return validate_kind(cfg, "prompt")


def validate_eval(cfg) -> dict:
    return validate_kind(cfg, "eval")


def validate_sft(cfg) -> dict:
    return validate_kind(cfg, "sft")
