"""Where a step runs.  Each backend turns the same ``rlhf run`` argv into a finished step.

* ``local``: a subprocess on the worker, its output streamed into the task log.
* ``kubernetes`` is not a backend object: the step operator is itself a
  KubernetesPodOperator (see ``operators/step.py`` and ``pods.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Protocol


class StepFailed(Exception):
    def __init__(self, step: str, exit_code: int, tail: str):
        super().__init__(f"step {step} exited with code {exit_code}: {tail}")
        self.step, self.exit_code, self.tail = step, exit_code, tail

    @property
    def bad_input(self) -> bool:
        return self.exit_code == 2


class StepBackend(Protocol):
    name: str

    def run(self, step: str, argv: list[str], log: Callable[[str], None]) -> dict: ...


def step_argv(step: str, config_uri: str, overrides: list[str], result: str,
              config_sha256: str | None = None) -> list[str]:
    """The step contract's argv: identical for a local process and a pod.  With the run
    config's digest, the step reads that exact file or stops (exit 2)."""
    argv = ["rlhf", "run", step, "--config", config_uri]
    if config_sha256:
        argv += ["--config-sha256", config_sha256]
    for item in overrides:
        argv += ["--set", item]
    return argv + ["--result", result]


# what a step process inherits from the worker: the basics of a process, and the settings
# of the libraries a step uses; never Airflow's own (its Fernet key, metadata DB URL,
# connections and variables), nor anything else the worker happens to hold
_STEP_ENV_NAMES = {"PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR", "TEMP", "TMP",
                   "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHASHSEED", "SSL_CERT_FILE",
                   "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "HTTP_PROXY",
                   "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
                   "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
                   "PYTORCH_CUDA_ALLOC_CONF", "TOKENIZERS_PARALLELISM"}
_STEP_ENV_PREFIXES = ("RLHF_", "AWS_", "MLFLOW_", "HF_", "TRANSFORMERS_", "GX_", "LC_",
                      "NCCL_", "TORCH_", "XDG_", "PYTHON")


def step_environment(environ: dict[str, str]) -> dict[str, str]:
    """The minimal environment of a step subprocess (see the names above)."""
    keep = {k: v for k, v in environ.items()
            if k in _STEP_ENV_NAMES or k.startswith(_STEP_ENV_PREFIXES)}
    return {**keep, "PYTHONUNBUFFERED": "1"}


class LocalProcessBackend:
    name = "local"

    def __init__(self, python: str | None = None, cwd: str | None = None):
        # $RLHF_STEP_PYTHON: a Python with the training stack, when Airflow's own has none
        # (docker/airflow.Dockerfile built with TRAINER=true puts one in /opt/rlhf/venv)
        self.python = python or os.environ.get("RLHF_STEP_PYTHON") or sys.executable
        self.cwd = cwd or os.environ.get("RLHF_WORKDIR") or os.getcwd()

    def run(self, step: str, argv: list[str], log: Callable[[str], None]) -> dict:
        with tempfile.TemporaryDirectory(prefix=f"rlhf-{step}-") as tmp:
            result = Path(tmp) / "result.json"
            argv = [a if a != "@RESULT@" else str(result) for a in argv]
            command = [self.python, "-m", "rlhf_tasks.cli"] + argv[1:]
            log("running: " + " ".join(command))
            env = step_environment(dict(os.environ))
            tail: list[str] = []
            with subprocess.Popen(command, cwd=self.cwd, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
                for line in proc.stdout:
                    line = line.rstrip("\n")
                    log(line)
                    tail = (tail + [line])[-5:]
                code = proc.wait()
            if code != 0:
                errors = [t for t in tail if "error" in t.lower()] or tail
                raise StepFailed(step, code, " | ".join(errors[-2:]))
            return json.loads(result.read_text(encoding="utf-8"))


BACKENDS: dict[str, Callable[[], StepBackend]] = {"local": LocalProcessBackend}


def get_backend(name: str) -> StepBackend:
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not available; available: {sorted(BACKENDS)}")
    return BACKENDS[name]()
