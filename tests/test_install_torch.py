"""`make`'s PyTorch install (scripts/install_torch.sh), run against a stand-in Python that
records each pip command: which build a machine gets, and from where."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUB = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$*" in
  *"-c "*) exit "$HAS_TORCH" ;;         # the 'already installed?' probe
  *--no-index*) exit "$LOCAL_WHEEL" ;;  # pip with this machine's find-links only
  *) exit 0 ;;
esac
"""


def _install(tmp_path: Path, *, local_wheel: bool, has_torch: bool = False,
             **env) -> tuple[int, list[str]]:
    python = tmp_path / "python"
    python.write_text(STUB)
    python.chmod(0o755)
    calls = tmp_path / "calls"
    calls.write_text("")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "install_torch.sh"), str(python)],
                          env={**os.environ, "CALLS": str(calls),
                               "LOCAL_WHEEL": "0" if local_wheel else "1",
                               "HAS_TORCH": "0" if has_torch else "1", **env},
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, [c for c in calls.read_text().splitlines()
                             if not c.startswith("-c ")]


def test_a_machine_with_the_cpu_wheel_installs_it_without_asking_an_index(tmp_path):
    code, calls = _install(tmp_path, local_wheel=True)
    assert code == 0 and calls == [
        "-m pip install -q --dry-run --no-index --no-deps torch==2.13.0",  # is it here?
        "-m pip install -q torch==2.13.0"]  # then pip takes it (its deps from the index)


def test_a_stock_machine_gets_the_cpu_build_from_pytorchs_cpu_index(tmp_path):
    code, calls = _install(tmp_path, local_wheel=False)
    assert code == 0 and calls[-1] == (
        "-m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu "
        "--extra-index-url https://pypi.org/simple")


def test_a_gpu_build_is_asked_for_by_name(tmp_path):
    code, calls = _install(tmp_path, local_wheel=True, TORCH_VARIANT="cu128")
    assert code == 0 and calls == [  # the local CPU wheel is not what was asked for
        "-m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128 "
        "--extra-index-url https://pypi.org/simple"]


@pytest.mark.parametrize("variant", ["cuda", "gpu", "cpu; rm -rf /"])
def test_an_unknown_variant_is_refused(tmp_path, variant):
    code, calls = _install(tmp_path, local_wheel=True, TORCH_VARIANT=variant)
    assert code == 2 and calls == []


def test_an_installed_torch_is_left_alone(tmp_path):
    code, calls = _install(tmp_path, local_wheel=True, has_torch=True)
    assert code == 0 and calls == []
