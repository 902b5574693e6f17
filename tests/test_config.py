import pytest

from rlhf_tasks import config
from rlhf_tasks.errors import BadInput


def test_defaults_validate():
    cfg = config.PipelineConfig()
    assert cfg.compute.backend == "local"
    assert cfg.tracking.tracking_uri == "sqlite:///.rlhf/mlflow.db"
    assert cfg.step_uri("validate_eval", "x.json").endswith("rlhf_tuning/manual/validate_eval/x.json")


def test_load_yaml_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ppo:\n  kl_coef: 0.2\ndata:\n  max_prompt_tokens: 32\n")
    cfg = config.load(str(path), ["ppo.kl_coef=0.3", "sft.enabled=true", "evaluation.baselines=[foundation]"])
    assert cfg.ppo.kl_coef == 0.3 and cfg.data.max_prompt_tokens == 32
    assert cfg.sft.enabled is True and cfg.evaluation.baselines == ["foundation"]


def test_load_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"reward": {"lora_rank": 4}}')
    assert config.load(str(path)).reward.lora_rank == 4


def test_bad_value_names_field_and_bounds():
    with pytest.raises(BadInput) as err:
        config.load(None, ["ppo.kl_coef=-1"])
    assert "ppo.kl_coef" in str(err.value) and "greater than or equal to 0" in str(err.value)


def test_bad_choice_names_allowed_values():
    with pytest.raises(BadInput) as err:
        config.load(None, ["compute.backend=slurm"])
    assert "compute.backend" in str(err.value) and "'local' or 'kubernetes'" in str(err.value)


def test_unknown_field_lists_allowed_fields():
    with pytest.raises(BadInput) as err:
        config.load(None, ["ppo.kl_coeff=0.1"])
    message = str(err.value)
    assert "ppo.kl_coeff" in message and "unknown field" in message and "kl_coef" in message


def test_unknown_section():
    with pytest.raises(BadInput, match="unknown field; allowed here: .*compute"):
        config.load(None, ["gpu.count=2"])


def test_override_syntax_error():
    with pytest.raises(BadInput, match="key=value"):
        config.load(None, ["ppo.kl_coef"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(BadInput, match="not found"):
        config.load(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo: [unclosed\n")
    with pytest.raises(BadInput, match="cannot parse"):
        config.load(str(bad))
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(BadInput, match="mapping of sections"):
        config.load(str(listy))


def test_simulated_panel_has_enough_raters_for_its_quorum():
    from rlhf_tasks import config
    from rlhf_tasks.errors import BadInput

    assert config.validate({"panel": {"verdicts_per_item": 3}}).panel.simulated_raters == 5
    assert config.validate({"panel": {"verdicts_per_item": 9}}).panel.simulated_raters == 9
    with pytest.raises(BadInput, match=r"simulated.raters \(3\) must be at least "
                                       r"verdicts_per_item \(7\)"):
        config.validate({"panel": {"verdicts_per_item": 7, "simulated": {"raters": 3}}})
    # people: any k
    config.validate({"panel": {"mode": "human", "verdicts_per_item": 7,
                               "simulated": {"raters": 3}}})


def test_no_module_outside_the_demo_names_the_demos_domain():
    """The demo is one customer: its domain (resume bullets, its template, its registered
    model) lives in rlhf_tasks/demo/ only."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    domain = re.compile(r"resume-assistant|résumé|\bresume[- ](writ|bullet|assist)|\bbullets?\b|"
                        r"Bullet:|Rewrite:|\bHR\b", re.IGNORECASE)
    offenders = []
    for folder in ("rlhf_tasks", "plugins", "dags"):
        for path in (root / folder).rglob("*"):
            if path.suffix not in (".py", ".html", ".yaml", ".json") or "demo" in path.parts:
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if domain.search(line):
                    offenders.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert offenders == []


@pytest.mark.parametrize("name,content,reason", [
    ("latin1.yaml", "model:\n  instruction: caf\xe9\n".encode("latin-1"), "not UTF-8 text"),
    ("deep.yaml", b"model: " + b"[" * 50_000 + b"]" * 50_000 + b"\n", "nested too deeply"),
    ("deep.json", b'{"model": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested too deeply"),
])
def test_unreadable_configs_exit_2_with_one_line(tmp_path, name, content, reason):
    import subprocess
    import sys

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BadInput, match=reason):
        config.load(str(path))
    proc = subprocess.run([sys.executable, "-m", "rlhf_tasks.cli", "run", "validate_prompt",
                           "--config", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "rlhf: error:" in lines[0] and reason in lines[0], proc.stderr


def test_config_params_are_flat_masked_and_leave_out_the_runs_plumbing():
    from rlhf_tasks import tracking

    cfg = config.validate({"panel": {"store_url": "postgresql://rlhf:s3cret@db:5432/panel"},
                           "tracking": {"parent_run_id": "abc"},
                           "ppo": {"lora_target_modules": ["q_proj", "v_proj"]},
                           "run": {"triggered_by": "ann"}})
    params = tracking.config_params(cfg)
    assert params["panel.store_url"] == "postgresql://rlhf:***@db:5432/panel"
    assert params["ppo.kl_coef"] == "0.05" and params["model.revision"] == "null"
    assert params["ppo.lora_target_modules"] == '["q_proj", "v_proj"]'
    assert params["compute.kubernetes.cpu"] == "4"  # nested sections dotted further
    assert not {"tracking.parent_run_id", "run.run_id", "run.triggered_by"} & set(params)
    assert not any("s3cret" in v for v in params.values())
    ppo = tracking.config_params(cfg, tracking.step_sections("ppo"))
    assert {k.split(".")[0] for k in ppo} == {"ppo", "tuning", "model", "data", "compute"}
    assert {k.split(".")[0] for k in tracking.config_params(
        cfg, tracking.step_sections("validate_eval"))} == {"data", "model"}


def test_candidates_of_one_run_and_of_a_bake_off():
    """One candidate keeps the label rlhf and the step's folder; a bake-off labels each by
    its algorithm, saves it in its own folder, and its RL ones share the ppo section."""
    from rlhf_tasks.config import Candidate

    assert config.PipelineConfig().candidates == [Candidate("rlhf", "ppo", "ppo", "ppo")]
    one = config.validate({"tuning": {"algorithms": ["dpo"]}})
    assert one.candidates == [Candidate("rlhf", "dpo", "dpo", "dpo")]
    assert one.candidate_for("dpo").folder == "dpo"
    raw = {"tuning": {"algorithms": ["ppo", "grpo", "dpo"]}, "ppo": {"samples_per_prompt": 4}}
    cfg = config.validate(raw)
    assert [(c.label, c.step, c.folder) for c in cfg.candidates] == [
        ("ppo", "ppo", "ppo"), ("grpo", "ppo", "grpo"), ("dpo", "dpo", "dpo")]
    assert cfg.candidate_for("dpo").label == "dpo"
    with pytest.raises(BadInput, match="trains 2 candidates with the ppo step"):
        cfg.candidate_for("ppo")  # which one: the DAG's task says
    task = config.validate({**raw, "tuning": {**raw["tuning"], "candidate": "grpo"}})
    grpo = task.candidate_for("ppo")
    assert grpo.folder == "grpo" and task.for_candidate(grpo).ppo.algorithm == "grpo"
    assert task.for_candidate(grpo).ppo.samples_per_prompt == 4  # the rest is shared
    with pytest.raises(BadInput, match="trained by the ppo step, not by dpo"):
        task.candidate_for("dpo")


def test_a_bake_off_refuses_what_its_candidates_cannot_train():
    with pytest.raises(BadInput, match="tuning.algorithms: grpo with the ppo section's settings: "
                                       "algorithm grpo compares"):
        config.validate({"tuning": {"algorithms": ["ppo", "grpo"]}})  # k = 1
    with pytest.raises(BadInput, match="ppo is named twice"):
        config.validate({"tuning": {"algorithms": ["ppo", "ppo"]}})
    with pytest.raises(BadInput, match="tuning.candidate dpo is not one of this run's"):
        config.validate({"tuning": {"algorithms": ["ppo", "grpo"], "candidate": "dpo"},
                         "ppo": {"samples_per_prompt": 2}})
    with pytest.raises(BadInput, match="tuning.algorithms"):
        config.validate({"tuning": {"algorithms": ["sft"]}})
