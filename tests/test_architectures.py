"""A team's own checkpoint: four real architectures (tiny, random, built offline) run
validate -> reward -> ppo -> evaluate through `rlhf run` on chat-format data, with their
own chat templates, pad and EOS conventions; the renderer on each; the registered model
as an MLflow model that pyfunc loads and `mlflow models serve` serves."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, write_jsonl
from tests.hf_families import FAMILIES, build_checkpoint

INSTRUCTION = "Answer in one short line."
# what a real checkpoint's generation_config.json often sets: rollouts must not inherit it
CHECKPOINT_SAMPLING = {"do_sample": True, "repetition_penalty": 1.3, "top_k": 20, "top_p": 0.9,
                       "min_new_tokens": 3}
# per family: a precision / LoRA setting to cover besides the defaults
EXTRA = {
    "llama": {"ppo": {"lora_target_modules": ["q_proj", "v_proj"], "lora_alpha": 8}},
    "qwen2": {"compute": {"dtype": "bf16", "gradient_checkpointing": True}},
    "gemma": {"reward": {"lora_dropout": 0.1, "lora_alpha": 4}},
    "gpt2": {"model": {"prompt_template": "### Instruction\n{instruction}\n### Input\n{prompt}\n"
                                          "### Response\n"}},
}


def _turns(*texts):
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": t} for i, t in enumerate(texts)]


def write_chat_data(folder: Path) -> dict[str, str]:
    prefs, prompts, evals = [], [], []
    for i in range(24):
        context = _turns(f"Rewrite bullet {i}: helped with payroll") if i % 3 else _turns(
            f"Draft bullet {i}", "Managed payroll.", "Make it stronger")
        prefs.append({"chosen": context + [{"role": "assistant",
                                            "content": f"Led payroll for {i + 10} staff."}],
                      "rejected": context + [{"role": "assistant", "content": "did stuff"}]})
    for i in range(16):
        prompts.append({"messages": [{"role": "system", "content": "You write resumes."}]
                        + _turns(f"Rewrite: wrote {i} reports")})
    for i in range(6):
        evals.append({"messages": _turns(f"Draft {i}", "Handled calls.", f"Shorter, try {i}")})
        if i % 2 == 0:  # an expert's own answer to half the eval prompts
            evals[-1]["reference"] = f"Handled {40 + i} calls a day."
    return {"preference_uri": str(write_jsonl(folder / "prefs.jsonl", prefs)),
            "prompt_uri": str(write_jsonl(folder / "prompts.jsonl", prompts)),
            "eval_uri": str(write_jsonl(folder / "eval.jsonl", evals))}


def family_config(tmp: Path, family: str, model_dir: Path, data: dict) -> Path:
    raw = {
        "run": {"pipeline": "byom", "run_id": family},
        "model": {"base_model": str(model_dir), "instruction": INSTRUCTION},
        "data": {**data, "min_preference_rows": 4, "min_prompt_rows": 4, "min_eval_rows": 2,
                 "max_prompt_tokens": 512, "max_target_tokens": 64},
        "storage": {"artifact_root": str(tmp / "artifacts"), "allowed_roots": [str(tmp)]},
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
                     "artifact_location": (tmp / "mlartifacts").as_uri()},
        "reward": {"train_steps": 3, "batch_size": 4, "norm_samples": 8, "eval_fraction": 0.25,
                   "checkpoint_every": 10},
        "ppo": {"train_steps": 2, "batch_size": 8, "num_minibatches": 2, "microbatch_size": 4,
                "ppo_epochs": 1, "response_length": 6},
        "evaluation": {"max_new_tokens": 6, "baselines": ["foundation"]},
        "panel": {"store_url": f"sqlite:///{tmp / 'panel.db'}"},
        "registry": {"model_name": f"byom-{family}"},
        "compute": {"device": "cpu"},
    }
    for section, values in EXTRA[family].items():
        raw.setdefault(section, {}).update(values)
    path = tmp / f"{family}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """Every family through validate -> reward -> ppo -> evaluate (`rlhf run`, in process)."""
    from rlhf_tasks.cli import main

    tmp = tmp_path_factory.mktemp("byom")
    data = write_chat_data(tmp)
    out = {}
    for family in FAMILIES:
        model_dir = build_checkpoint(family, tmp / "models" / family,
                                     generation=CHECKPOINT_SAMPLING)
        config = family_config(tmp, family, model_dir, data)
        results = {}
        for step in ("validate_preference", "validate_prompt", "validate_eval", "reward", "ppo",
                     "evaluate"):
            result = tmp / f"{family}-{step}.json"
            code = main(["run", step, "--config", str(config), "--result", str(result)])
            assert code == 0, (family, step)
            results[step] = json.loads(result.read_text())
        out[family] = {"config": config, "model_dir": model_dir, "results": results}
    return tmp, out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_renderer_follows_the_family(family, tmp_path):
    from rlhf_tasks.models import load_tokenizer_from
    from rlhf_tasks.prompting import PromptRenderer, checkpoint_eos_ids

    spec = FAMILIES[family]
    model_dir = build_checkpoint(family, tmp_path / family)
    tokenizer = load_tokenizer_from(str(model_dir))
    vocab = len(tokenizer)
    renderer = PromptRenderer(tokenizer, "auto", INSTRUCTION, model_eos_ids=checkpoint_eos_ids(
        model_dir))
    assert renderer.format == ("chat" if spec["template"] else "template")
    assert len(tokenizer) == vocab, "padding must not add a token"
    # generation stops at every EOS id of the checkpoint and at the end of turn
    expected = {tokenizer.convert_tokens_to_ids(t) for t in spec["model_eos"] + [spec["end_of_turn"]]}
    assert set(renderer.stop_ids) == expected
    assert renderer.response_ids("Led a team")[-1] == tokenizer.convert_tokens_to_ids(
        spec["end_of_turn"])
    conversation = _turns("Draft a bullet", "Managed payroll.", "Shorter")
    text = renderer.prompt_text("", conversation)
    if renderer.format == "chat":
        # every turn kept, in order, and the template's own generation prompt at the end
        positions = [text.index(m["content"]) for m in conversation]
        assert positions == sorted(positions)
        assert text == tokenizer.apply_chat_template(
            renderer.conversation("", conversation), tokenize=False, add_generation_prompt=True)
        # the instruction is the system message where the template has one, else it opens
        # the first user turn
        assert renderer.system_role == spec["system_role"]
        system = renderer.conversation("", conversation)[0]
        if spec["system_role"]:
            assert system == {"role": "system", "content": INSTRUCTION}
        else:
            assert system["role"] == "user" and system["content"].startswith(INSTRUCTION)
    else:
        assert text == f"{INSTRUCTION}\n\nuser: Draft a bullet\nassistant: Managed payroll.\n" \
                       "user: Shorter\n"


@pytest.mark.e2e
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_runs_the_pipeline_on_chat_data(families, family):
    import mlflow

    from rlhf_tasks import config as config_mod
    from rlhf_tasks import models
    from rlhf_tasks.prompting import SETTINGS_FILE

    tmp, runs = families
    run = runs[family]
    results, cfg = run["results"], config_mod.load(str(run["config"]))
    assert results["validate_preference"]["rows_kept"] == 24
    assert results["ppo"]["updates"] == 2
    # the experts' reference answers are one more blinded "model" in the batch
    assert set(results["evaluate"]["metrics"]) == {"foundation", "rlhf", "reference"}
    assert results["evaluate"]["items"] == 6 + 6 + 3
    # the vocabulary is the checkpoint's: no pad token was added
    tokenizer = models.load_tokenizer(cfg)
    assert len(tokenizer) == 300
    # every step rendered with the same prompt format, saved beside the model
    saved = json.loads((Path(results["ppo"]["model_uri"]) / SETTINGS_FILE).read_text())
    assert saved == models.renderer(cfg, tokenizer).settings()
    # the base model's resolved revision and weights digest are in MLflow
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    params = mlflow.get_run(results["ppo"]["mlflow_run_id"]).data.params
    assert len(params["model.weights_sha256"]) == 64
    assert params == {**params, **{k: v for k, v in models.describe(cfg).items()
                                   if k != "model.resolved_path"}}
    # the review batch shows the conversation as people read it, not the template's tokens
    rows = [json.loads(line) for line in
            open(Path(cfg.step_uri("evaluate")) / "responses.jsonl")]
    assert rows[0]["prompt"].startswith("user: Draft 0\nassistant: Handled calls.")
    assert "<|" not in rows[0]["prompt"] and "<start_of_turn>" not in rows[0]["prompt"]


def _serve(model_uri: str, env: dict, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager",
         "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.e2e
def test_registered_champion_is_an_mlflow_model_that_serves(families):
    """The gate registers ppo/served and reward/served; pyfunc loads the champion and
    answers as evaluation decoded; `mlflow models serve` answers over HTTP the same."""
    import os

    import mlflow
    import pandas as pd
    import requests

    from rlhf_tasks import config as config_mod
    from rlhf_tasks import models, registry
    from rlhf_tasks.generation import generate
    from rlhf_tasks.storage import Storage

    tmp, runs = families
    cfg = config_mod.load(str(runs["llama"]["config"]))
    storage = Storage.from_config(cfg)
    name = cfg.registry.model_name
    version = registry.register(cfg, storage, name=name, source=cfg.step_uri("ppo", "served"),
                                run_id=None, tags={})
    reward_version = registry.register(cfg, storage, name=registry.reward_model_name(cfg),
                                       source=cfg.step_uri("reward", "served"), run_id=None,
                                       tags={})
    registry.promote(cfg, name, version.version, expected_champion=None,
                     reward=(registry.reward_model_name(cfg), reward_version.version))

    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    served = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert served.metadata.get_input_schema().input_types()[0].name == "string"
    assert served.metadata.metadata["prompt_format"]["format"] == "chat"
    conversation = json.dumps(_turns("Draft 1", "Handled calls.", "Shorter, try 1"))
    prompts = ["Rewrite: wrote 3 reports", conversation]
    greedy = served.predict(prompts, params={"temperature": 0.0})
    assert len(greedy) == 2 and all(isinstance(t, str) for t in greedy)

    # the same answers as the training-side rendering + decoding, greedy
    tokenizer = models.load_tokenizer(cfg)
    renderer = models.renderer(cfg, tokenizer)
    from transformers import AutoModelForCausalLM

    from rlhf_tasks import serving

    local = mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=str(tmp / "dl"))
    model = AutoModelForCausalLM.from_pretrained(serving.hf_folder(Path(local)))
    encoded = [renderer.prompt_ids(prompts[0]), renderer.prompt_ids("", json.loads(conversation))]
    ids, _ = generate(model, tokenizer, renderer, encoded, temperature=0.0,
                      max_new_tokens=cfg.evaluation.max_new_tokens, seed=0, device="cpu")
    assert greedy == [renderer.response_text(r) for r in ids]

    scores = mlflow.pyfunc.load_model(f"models:/{registry.reward_model_name(cfg)}@champion"
                                      ).predict(pd.DataFrame({"prompt": prompts[:1] * 2,
                                                              "response": ["Led 5 staff.", "x"]}))
    assert len(scores) == 2 and all(s == s for s in scores)

    port = free_port()
    # the serving environment: this venv on PATH (mlflow starts uvicorn from it)
    env = {**os.environ, "MLFLOW_TRACKING_URI": cfg.tracking.tracking_uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = _serve(f"models:/{name}@champion", env, port)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "mlflow models serve did not come up"
            time.sleep(0.5)
        reply = requests.post(f"http://127.0.0.1:{port}/invocations", timeout=60,
                              json={"inputs": prompts, "params": {"temperature": 0.0}})
        assert reply.status_code == 200, reply.text
        assert reply.json()["predictions"] == greedy
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.e2e
def test_a_simulated_panel_reports_unless_the_base_config_lets_it_promote(families, tmp_path):
    """Simulated raters under a policy any candidate meets: without
    ``panel.simulated_may_promote`` the gate's outcome is a report and promote refuses
    (exit 2); the gate closed the batch, so a late verdict is refused, and a gate run
    again (now allowed) decides on the same verdicts: a decision, no longer a report."""
    import yaml

    from rlhf_tasks import config as config_mod
    from rlhf_tasks import registry
    from rlhf_tasks.cli import main
    from rlhf_tasks.panel.store import BatchClosed, PanelStore

    tmp, runs = families
    raw = yaml.safe_load(Path(runs["gpt2"]["config"]).read_text())
    raw["panel"].update(pass_rate_threshold=0.0, min_lift=-1.0, significance=0.99)
    config = tmp_path / "lenient.yaml"
    config.write_text(yaml.safe_dump(raw))

    def step(name: str, path: Path = config) -> tuple[int, dict]:
        out = tmp_path / f"{name}.json"
        code = main(["run", name, "--config", str(path), "--result", str(out)])
        return code, (json.loads(out.read_text()) if out.exists() else {})

    assert step("panel_simulate")[0] == 0
    code, gate = step("gate")
    assert code == 0 and gate["decision"] == "report", gate
    assert set(gate["pass_rates"]) == {"foundation", "rlhf", "reference"}
    assert any("simulated_may_promote" in r for r in gate["reasons"])
    cfg = config_mod.load(str(config))
    version = registry.client(cfg).get_model_version(cfg.registry.model_name, gate["version"])
    assert version.tags["gate.decision"] == "report" and not version.aliases
    assert step("promote")[0] == 2
    assert registry.champion(cfg) is None
    store = PanelStore(cfg.panel.store_url)
    try:
        item = store.items(gate_batch := json.loads(
            (Path(cfg.step_uri("gate")) / "gate.json").read_text())["batch_id"])[0]["id"]
        with pytest.raises(BatchClosed):
            store.record_verdict(item, "latecomer", False)
        verdicts = len(store.verdict_rows(gate_batch))
    finally:
        store.dispose()
    raw["panel"]["simulated_may_promote"] = True
    allowed = tmp_path / "allowed.yaml"
    allowed.write_text(yaml.safe_dump(raw))
    code, again = step("gate", allowed)
    assert code == 0 and again["version"] == gate["version"]
    assert again["decision"] in ("promote", "reject") and not any(
        "simulated_may_promote" in r for r in again["reasons"])
    assert again["pass_rates"] == gate["pass_rates"]  # the same closed snapshot
    store = PanelStore(cfg.panel.store_url)
    try:
        assert len(store.verdict_rows(gate_batch)) == verdicts
    finally:
        store.dispose()
