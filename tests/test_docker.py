"""docker/: the Dockerfiles lint clean (hadolint), the compose stack validates
(`docker compose config`, or Debian's docker-compose), and the manifests agree with the
config defaults the pod operator uses."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_tasks import config

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


@pytest.mark.parametrize("dockerfile", sorted(p.name for p in DOCKER.glob("*.Dockerfile")))
def test_dockerfiles_lint_clean(dockerfile):
    hadolint = Path(sys.executable).parent / "hadolint"
    proc = subprocess.run([str(hadolint), "--no-color", str(DOCKER / dockerfile)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                 capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_stack_validates():
    command = _compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor docker-compose (scripts/test.sh installs it)")
    proc = subprocess.run(command + ["-f", str(DOCKER / "docker-compose.yml"), "config"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    stack = yaml.safe_load(proc.stdout)["services"]
    assert {"postgres", "minio", "mlflow", "airflow-init", "airflow-apiserver",
            "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"} <= set(stack)
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                 "airflow-triggerer"):
        env = stack[name]["environment"]
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
        assert env["RLHF_PANEL_STORE_URL"].startswith("postgresql+psycopg2://")
        assert stack[name]["depends_on"]["airflow-init"]["condition"] == \
            "service_completed_successfully"
    # the scheduler runs `backend: local` steps: its image has the training venv
    assert stack["airflow-scheduler"]["build"]["args"]["TRAINER"] == "true"
    assert stack["airflow-scheduler"]["environment"]["RLHF_STEP_PYTHON"] == \
        "/opt/rlhf/venv/bin/python"
    assert "--backend-store-uri=postgresql+psycopg2://" in " ".join(stack["mlflow"]["command"])
    assert "--artifacts-destination=s3://mlflow" in stack["mlflow"]["command"]
    base = config.load(str(DOCKER / "compose-config.yaml"))
    assert base.storage.artifact_root.startswith("s3://") and base.panel.mode == "human"


def _pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==(\S+)", line.strip())
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def test_airflow_image_pins_match_and_carry_no_torch():
    airflow, everything = _pins(DOCKER / "requirements-airflow.txt"), _pins(ROOT / "requirements.txt")
    assert not {"torch", "transformers", "trl", "peft", "great-expectations"} & set(airflow)
    for name, version in airflow.items():
        assert everything.get(name) == version, name
    text = (DOCKER / "airflow.Dockerfile").read_text()
    assert "FROM apache/airflow:" + everything["apache-airflow"] in text
    trainer = (DOCKER / "trainer.Dockerfile").read_text()
    assert re.search(r"^USER 1000", trainer, re.M), "the trainer runs as a non-root user"
    assert "requirements.txt" in trainer


def test_manifests_match_the_pod_defaults():
    k8s = config.KubernetesSection()
    docs = [d for f in sorted((DOCKER / "k8s").glob("*.yaml"))
            for d in yaml.safe_load_all(f.read_text()) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    assert by_kind["Namespace"][0]["metadata"]["name"] == k8s.namespace
    assert by_kind["ServiceAccount"][0]["metadata"]["name"] == k8s.service_account
    rules = {(r["resources"][0], v) for r in by_kind["Role"][0]["rules"] for v in r["verbs"]}
    for needed in [("pods", "create"), ("pods", "delete"), ("pods", "watch"),
                   ("pods/log", "get"), ("pods/exec", "create")]:
        assert needed in rules, needed
    assert {s["metadata"]["name"] for s in by_kind["Secret"]} == set(k8s.env_secrets)
    pool = by_kind["NodePool"][0]["spec"]["template"]
    assert pool["metadata"]["labels"] == k8s.node_selector
    assert pool["spec"]["taints"][0]["key"] == k8s.tolerations[0]["key"]


def test_helm_values_carry_a_valid_base_config():
    values = yaml.safe_load((DOCKER / "helm" / "values.yaml").read_text())
    assert values["postgresql"]["enabled"] is False and values["triggerer"]["enabled"]
    base = yaml.safe_load(values["extraConfigMaps"]["rlhf-base-config"]["data"])["base.yaml"]
    cfg = config.validate(yaml.safe_load(base), "helm values")
    assert cfg.compute.backend == "kubernetes" and cfg.schedule.cron == "0 3 * * 1"
