"""The rlhf command: exit codes (0 done, 2 bad input, 1 fault) and clear messages."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import write_jsonl

GOOD = {"prompt": "worked on the help desk", "chosen": "Led help desk, cutting delays by 20%",
        "rejected": "Helped with the help desk"}


def rlhf_process(*args, cwd=None):
    """The command as a user runs it: its own process."""
    return subprocess.run([sys.executable, "-m", "rlhf_tasks.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def rlhf(*args, cwd=None):
    """``rlhf.cli.main`` in this process (each process start-up costs seconds of imports):
    its exit code, what it printed, and on stderr its log records too, as the command's
    own logging would write them there."""
    import contextlib
    import io
    import logging

    from rlhf_tasks import cli

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)  # the command's own level (cli._setup_logging)
    here = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main([str(a) for a in args])
    finally:
        os.chdir(here)
        root.removeHandler(handler)
        root.setLevel(level)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_data_validate_prints_summary(demo_dir):
    proc = rlhf("data", "validate", str(demo_dir / "preferences.jsonl"), "--kind", "preference",
                "--eval-set", str(demo_dir / "eval.jsonl"), "--tokenizer",
                str(demo_dir / "foundation"), "--max-bad-fraction", "0.01")
    assert proc.returncode == 0, proc.stderr
    assert "rows read         4010" in proc.stdout
    assert "rows kept         4000" in proc.stdout
    assert "duplicate row" in proc.stdout and "Traceback" not in proc.stderr


def test_bad_rows_exit_2_naming_file_line_field(tmp_path, demo_dir):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD, {**GOOD, "prompt": "x", "chosen": 5}])
    proc = rlhf_process("data", "validate", str(path), "--kind", "preference",
                "--tokenizer", str(demo_dir / "foundation"))
    assert proc.returncode == 2
    assert f"{path} line 2 field 'chosen': expected a string, got int" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_malformed_files_fail_cleanly(tmp_path, demo_dir):
    tok = ["--tokenizer", str(demo_dir / "foundation")]
    cases = {
        "empty.jsonl": (b"", "file is empty"),
        "utf16.jsonl": ('{"prompt": "a"}\n'.encode("utf-16"), "UTF-16"),
        "garbage.jsonl": (b"not json\nstill not\n", "no row could be parsed"),
        "cols.jsonl": (b'{"question": "a", "answer": "b"}\n', "no preference format matches"),
        "latin1.csv": ("prompt,chosen,rejected\ncaf\xe9,a,b\n".encode("latin-1"), "not valid UTF-8"),
        "fake.parquet": (b"PAR1 not really", "not a readable Parquet file"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        proc = rlhf("data", "validate", str(path), "--kind", "preference", *tok)
        assert proc.returncode == 2, (name, proc.stderr)
        assert message in proc.stderr, (name, proc.stderr)
        assert "Traceback" not in proc.stderr, name


def test_file_too_large_is_refused_before_reading(tmp_path, demo_dir):
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as fh:
        fh.truncate(3 * 1024 * 1024)  # sparse: 3 MiB of zeros on paper
    proc = rlhf("data", "validate", str(path), "--kind", "prompt", "--tokenizer",
                str(demo_dir / "foundation"), "--set", "data.max_file_mb=1")
    assert proc.returncode == 2 and "over data.max_file_mb=1" in proc.stderr


def test_run_step_with_bad_config_exits_2(tmp_path):
    proc = rlhf("run", "validate_eval", "--set", "ppo.kl_coef=-3", "--result", str(tmp_path / "r.json"))
    assert proc.returncode == 2 and "config field 'ppo.kl_coef'" in proc.stderr
    assert not (tmp_path / "r.json").exists()
    proc = rlhf("run", "no_such_step")
    assert proc.returncode == 2 and "unknown step" in proc.stderr


def test_run_validate_step_writes_result(tmp_path, demo_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {{base_model: {demo_dir / 'foundation'}}}\n"
        f"data: {{eval_uri: {demo_dir / 'eval.jsonl'}}}\n"
        f"storage: {{artifact_root: {tmp_path / 'art'}, allowed_roots: [{demo_dir}]}}\n"
        f"tracking: {{tracking_uri: 'sqlite:///{tmp_path / 'm.db'}'}}\n")
    proc = rlhf("run", "validate_eval", "--config", str(cfg), "--set", "run.run_id=t1",
                "--result", str(tmp_path / "out" / "r.json"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "out" / "r.json").read_text())
    assert result["step"] == "validate_eval" and result["rows_kept"] == 200
    assert result["canonical_uri"] == f"{tmp_path / 'art'}/rlhf_tuning/t1/validate_eval/canonical.parquet"
    assert "step validate_eval done" in proc.stderr  # the log is read here
    assert "validate_eval: 200" not in proc.stderr  # no progress spam for small work
    # the step's compute, measured: wall time and the devices it held (here CPU cores)
    record = json.loads((tmp_path / "art" / "rlhf_tuning" / "t1" / "compute" /
                         "validate_eval.json").read_text())
    assert record == result["compute"]
    assert record["device"] == "cpu" and record["devices"] == len(os.sched_getaffinity(0))
    assert 0 < record["wall_seconds"] <= result["seconds"] + 0.01
    assert record["device_hours"] == pytest.approx(
        record["wall_seconds"] * record["devices"] / 3600, abs=1e-6)


def test_fault_exits_1(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tracking: {tracking_uri: 'sqlite:////proc/no-such-dir/m.db'}\n"
                   f"storage: {{artifact_root: {tmp_path / 'art'}}}\n")
    proc = rlhf_process("run", "start", "--config", str(cfg), "--result",
                        str(tmp_path / "r.json"))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" in proc.stderr  # a fault: the full traceback, for the log


def test_review_serve_never_prints_the_store_password(postgres_url):
    """The verdict store URL may carry a password: the banner masks it."""
    import os
    import select
    import subprocess
    import sys

    from sqlalchemy.engine import make_url

    from tests.conftest import free_port

    url = make_url(postgres_url).set(password="s3cret-pw").render_as_string(hide_password=False)
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_tasks.cli", "review", "serve",
                             "--store", url, "--port", str(free_port())],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "no banner within 60 s"
        banner = proc.stdout.readline()
    finally:
        proc.terminate()
        rest = proc.communicate(timeout=30)[0]
    assert "review page:" in banner and "***" in banner, banner
    assert "s3cret-pw" not in banner + rest


def test_data_validate_works_from_any_folder_and_checks_tokens_only_with_a_tokenizer(
        tmp_path, demo_dir):
    """From a folder with no project in it: no model is needed and token lengths are not
    checked; with --tokenizer the same file's long row is quarantined."""
    long_prompt = " ".join(["payroll"] * 400)
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD, {**GOOD, "prompt": long_prompt}])
    few = ["--set", "data.min_preference_rows=1"]
    proc = rlhf("data", "validate", str(path), "--kind", "preference", *few, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "token lengths not checked" in proc.stdout and "rows kept         2" in proc.stdout
    proc = rlhf("data", "validate", str(path), "--kind", "preference", "--tokenizer",
                str(demo_dir / "foundation"), "--max-bad-fraction", "0.5", *few, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "rows kept         1" in proc.stdout and "prompt longer than 64 tokens" in proc.stdout
