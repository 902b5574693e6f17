"""The training steps on the demo: the reward model learns, PPO learns within its KL bound,
checkpoints resume, and a resumed PPO run ends with the weights of an uninterrupted one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from rlhf_tasks.steps.ppo import ppo
from rlhf_tasks.steps.reward import reward
from rlhf_tasks.steps.sft import sft
from rlhf_tasks.steps.validate import validate_kind

PPO = {"train_steps": 16, "batch_size": 32, "num_minibatches": 4, "microbatch_size": 8,
       "ppo_epochs": 4, "response_length": 24, "temperature": 0.7, "kl_coef": 0.05,
       "kl_target": 0.5, "checkpoint_every": 8}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_model_dir):
    """Validate, then train reward, SFT and PPO once on the demo (about 2 minutes)."""
    from rlhf_tasks import config

    tmp = tmp_path_factory.mktemp("training")
    import yaml

    raw = yaml.safe_load((demo_model_dir / "demo.yaml").read_text())
    raw["storage"] = {"artifact_root": str(tmp / "artifacts"),
                      "allowed_roots": [str(demo_model_dir), str(tmp)]}
    raw["tracking"] = {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
                       "artifact_location": (tmp / "mlartifacts").as_uri()}
    raw["reward"] = {"train_steps": 120, "batch_size": 16, "checkpoint_every": 60,
                     "norm_samples": 128}
    raw["sft"] = {"enabled": True, "train_steps": 20, "batch_size": 16, "checkpoint_every": 10}
    raw["ppo"] = PPO
    # the quality bounds below were measured in fp32: the same on a CPU with AMX bf16
    # (where compute.dtype auto would choose bf16; the qwen2 family test runs in bf16)
    raw["compute"] = {**raw.get("compute", {}), "dtype": "fp32"}
    cfg = config.validate(raw)
    for kind in ("preference", "prompt", "eval", "sft"):
        validate_kind(cfg, kind)
    results = {"reward": reward(cfg), "sft": sft(cfg), "ppo": ppo(cfg)}
    return cfg, results, tmp


def _eval_prompts(cfg, tokenizer, n=96):
    from rlhf_tasks import models

    renderer = models.renderer(cfg, tokenizer)
    lines = open(cfg.data.eval_uri).read().splitlines()[:n]
    return [renderer.prompt_ids(json.loads(line)["prompt"]) for line in lines]


def test_reward_model_beats_chance_and_is_normalised(trained):
    cfg, results, _ = trained
    result = results["reward"]
    assert result["heldout_pairs"] > 100
    assert result["heldout_accuracy"] > 0.75, result
    info = json.loads(open(f"{result['model_uri']}/reward_model.json").read())
    assert info["kind"] == "lora" and info["normalisation"]["samples"] == 128
    assert (open(f"{result['model_uri']}/adapter_model.safetensors", "rb").read(8))
    # PPO's first rollouts come from the reference policy: normalised, they are ~N(0, 1)
    first = json.loads(open(f"{results['ppo']['model_uri']}/history.json").read())[0]
    assert abs(first["reward_mean"]) < 0.5 and 0.5 < first["reward_std"] < 1.6, first


def test_ppo_raises_the_reward_of_fresh_samples_within_the_kl_bound(trained):
    """Fresh samples on held-out prompts: tuned policy vs the policy RL started from (the
    SFT policy, its adapter disabled), scored by the reward model."""
    from peft import PeftModel

    from rlhf_tasks import models
    from rlhf_tasks.generation import collate_prompts, position_ids
    from rlhf_tasks.reward_model import load_reward_model, sequence_scores
    from rlhf_tasks.rl import core
    from rlhf_tasks.rl.forwards import response_logits
    from rlhf_tasks.rl.rollout import rollout
    from rlhf_tasks.rl.settings import rl_settings

    from rlhf_tasks.steps.ppo import starting_policy
    from rlhf_tasks.storage import Storage

    cfg, results, tmp = trained
    tokenizer = models.load_tokenizer(cfg)
    scorer, info = load_reward_model(results["reward"]["model_uri"],
                                     base_model_dir=models.local_model_dir(cfg.model.base_model))
    start = starting_policy(cfg, Storage.from_config(cfg), tmp / "start-policy")
    policy = PeftModel.from_pretrained(start, results["ppo"]["model_uri"])
    policy.eval()
    settings = rl_settings(cfg)
    ids, mask = collate_prompts(_eval_prompts(cfg, tokenizer), tokenizer.pad_token_id, "cpu")
    norm = info["normalisation"]
    measured = {}
    for name in ("base", "tuned"):
        torch.manual_seed(0)
        if name == "base":
            with policy.disable_adapter():
                responses, _ = rollout(policy, ids, mask, settings, tokenizer.eos_token_id,
                                       tokenizer.pad_token_id)
        else:
            responses, _ = rollout(policy, ids, mask, settings, tokenizer.eos_token_id,
                                   tokenizer.pad_token_id)
        keep, _ = core.response_mask(responses, tokenizer.eos_token_id)
        responses = responses.masked_fill(keep == 0, tokenizer.pad_token_id)
        full = torch.cat([ids, responses], 1)
        full_mask = torch.cat([mask, keep], 1)
        pos = position_ids(full_mask)
        with torch.no_grad():
            scores = sequence_scores(scorer, full, full_mask, pos, ids.shape[1] + keep.sum(1) - 1)
            width = responses.shape[1]
            logp = core.selective_logprobs(
                response_logits(policy, full, full_mask, pos, width, settings.temperature),
                responses)
            with policy.disable_adapter():
                ref = core.selective_logprobs(
                    response_logits(policy, full, full_mask, pos, width, settings.temperature),
                    responses)
        # KL(tuned || reference) of the tuned policy's samples (0 for the base by definition)
        kl = ((logp - ref) * keep).sum(1).mean().item()
        measured[name] = {"reward": ((scores - norm["mean"]) / norm["std"]).mean().item(),
                          "kl": kl}
    lift = measured["tuned"]["reward"] - measured["base"]["reward"]
    assert lift > 0.3, measured  # in units of the reference policy's score std
    # the adaptive controller aims at kl_target; allow the overshoot of a short run
    assert 0 < measured["tuned"]["kl"] < 2 * PPO["kl_target"], measured


def test_ppo_logs_every_metric_each_update(trained):
    import mlflow

    cfg, results, tmp = trained
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    run = mlflow.get_run(results["ppo"]["mlflow_run_id"])
    for name in ("reward_mean", "reward_std", "kl", "entropy", "policy_clipfrac",
                 "value_clipfrac", "approx_kl", "value_loss", "explained_variance",
                 "response_length", "tokens_per_s"):
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, f"ppo/{name}")
        assert len(history) == PPO["train_steps"], name
    assert "reward/heldout/accuracy" in mlflow.get_run(
        results["reward"]["mlflow_run_id"]).data.metrics
    assert any(k.startswith("sft/train/") for k in mlflow.get_run(
        results["sft"]["mlflow_run_id"]).data.metrics)


def test_ppo_resumes_to_the_same_weights(trained):
    """Stop after 2 updates (a checkpoint every 2), rerun: the same weights as 4 in one go."""
    from safetensors.torch import load_file

    cfg, _, tmp = trained
    src = f"{cfg.storage.artifact_root}/{cfg.run.pipeline}/{cfg.run.run_id}"
    short = {**PPO, "train_steps": 4, "checkpoint_every": 2, "batch_size": 16,
             "num_minibatches": 2}
    weights = {}
    for run_id in ("straight", "resumed"):
        for step in ("validate_prompt", "reward", "sft"):
            shutil.copytree(f"{src}/{step}", f"{cfg.storage.artifact_root}/{cfg.run.pipeline}/"
                                             f"{run_id}/{step}")
        run_cfg = cfg.model_copy(deep=True)
        run_cfg.run.run_id = run_id
        run_cfg.ppo = run_cfg.ppo.model_validate({**short, "merge_adapter": run_id == "straight"})
        if run_id == "resumed":
            stopped = ppo(run_cfg, stop_after=2)
            assert stopped == {"updates": 2, "stopped_early": True,
                               "mlflow_run_id": stopped["mlflow_run_id"]}
        result = ppo(run_cfg)
        assert result["updates"] == 4
        assert result["resumed_from"] == (2 if run_id == "resumed" else 0)
        weights[run_id] = load_file(f"{result['model_uri']}/adapter_model.safetensors")
    assert weights["straight"].keys() == weights["resumed"].keys()
    for name, tensor in weights["straight"].items():
        assert torch.equal(tensor, weights["resumed"][name]), name
    # RL started from the SFT policy (sft.enabled): the saved adapter sits on the SFT
    # weights merged into the base, and the merged checkpoint computes what they compute
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlhf_tasks.steps.ppo import starting_policy
    from rlhf_tasks.storage import Storage

    model_dir = f"{cfg.storage.artifact_root}/{cfg.run.pipeline}/straight/ppo/model"
    summary = json.loads(open(f"{model_dir}/ppo_summary.json").read())
    assert summary["init_from"] == "sft" and summary["init_model"].endswith("/sft/model")
    merged = AutoModelForCausalLM.from_pretrained(f"{model_dir}/merged", use_safetensors=True)
    adapted = PeftModel.from_pretrained(
        starting_policy(cfg, Storage.from_config(cfg), tmp / "start"), model_dir)
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)


# fsdp only: the replicated (ddp) loop across processes is test_ppo_ddp's, and the step's
# edges (launch, node 0 reports and saves, resume) are the same under both strategies
@pytest.mark.parametrize("strategy", ["fsdp"])
def test_two_nodes_run_the_ppo_step_to_the_end(trained, tmp_path, strategy):
    """Two machines as a Kubeflow TrainJob runs them, on the loopback address: two torchrun
    agents (one process each) started with the TrainJob's own command and args, and the
    ``PET_*`` variables the torch runtime gives each node; the c10d rendezvous pairs them,
    PPO runs to the end, both nodes end with the same weights, node 0 reports and saves
    the model.  With fsdp the models are sharded across the two nodes and gathered whole
    for saving."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from rlhf_airflow import trainjob
    from rlhf_tasks import config
    from rlhf_tasks.storage import Storage
    from tests.conftest import free_port

    cfg, _, _ = trained
    src = f"{cfg.storage.artifact_root}/{cfg.run.pipeline}/{cfg.run.run_id}"
    raw = cfg.model_dump(mode="json")
    raw["run"]["run_id"] = f"two-nodes-{strategy}"
    raw["ppo"].update(train_steps=3, batch_size=8, num_minibatches=2, microbatch_size=4,
                      ppo_epochs=2, checkpoint_every=3, merge_adapter=False)
    raw["compute"].update(backend="kubernetes", num_nodes=2, num_gpus=0, device="cpu",
                          strategy=strategy)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    run_cfg = config.load(str(config_file))
    for step in ("validate_prompt", "reward", "sft"):
        shutil.copytree(f"{src}/{step}", run_cfg.step_uri(step))
    name = trainjob.job_name(run_cfg.run.run_id, "ppo", 1)
    result = trainjob.result_uri(run_cfg, "ppo", 1)
    spec = trainjob.manifest(run_cfg, "ppo", str(config_file), [], name, result)["spec"]
    assert spec["trainer"]["numNodes"] == 2 and spec["trainer"]["numProcPerNode"] == 1

    def two_nodes() -> list[str]:
        port = free_port()
        agents = []
        for node in range(2):
            pet = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": str(node),
                   "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}
            # what Kubernetes does with $(VAR) in a container's command
            argv = [re.sub(r"\$\((\w+)\)", lambda m: pet[m.group(1)], a)
                    for a in spec["trainer"]["command"] + spec["trainer"]["args"]]
            argv[0] = str(Path(sys.executable).with_name("torchrun"))
            agents.append(subprocess.Popen(
                argv, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True,
                env={**os.environ, **pet, "OMP_NUM_THREADS": "1"}))
        outputs = [agent.communicate(timeout=600)[0] for agent in agents]
        assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
        return outputs

    outputs = two_nodes()
    said = re.findall(r"trainable weights sha256 (\w+) \(process (\d) of (\d)\)",
                      "\n".join(outputs))
    assert sorted((rank, world) for _, rank, world in said) == [("0", "2"), ("1", "2")]
    assert len({digest for digest, _, _ in said}) == 1, said  # the same weights on both
    report = Storage.from_config(run_cfg).read_json(result)  # written by node 0 alone
    assert report["updates"] == 3 and report["processes"] == 2
    assert report["weights_sha256"] == said[0][0]
    # the saved adapter is whole (gathered from the shards under fsdp) and is the weights
    # both nodes reported
    from peft import PeftModel
    from safetensors.torch import load_file

    from rlhf_tasks import models
    from rlhf_tasks.rl.checkpoints import weights_digest

    adapter = load_file(f"{report['model_uri']}/adapter_model.safetensors")
    assert adapter and all(t.dim() == 2 for t in adapter.values())
    saved = PeftModel.from_pretrained(models.load_causal_lm(run_cfg), report["model_uri"],
                                      is_trainable=True)
    assert weights_digest(saved) == report["weights_sha256"]
    if strategy != "fsdp":
        return
    # the checkpoint in the store is sharded: each node uploaded its own part, node 0 the
    # manifest of both; a longer rerun on the two nodes resumes from it
    storage = Storage.from_config(run_cfg)
    checkpoint = run_cfg.step_uri("ppo", "checkpoints") + "/update-000003"
    files = storage.read_json(f"{checkpoint}/MANIFEST.json")["files"]
    assert {"shards/__0_0.distcp", "shards/__1_0.distcp", "shards/.metadata",
            "state.pt"} <= set(files), files
    raw["ppo"]["train_steps"] = 4
    config_file.write_text(yaml.safe_dump(raw))
    two_nodes()
    rerun = storage.read_json(result)
    assert rerun["resumed_from"] == 3 and rerun["updates"] == 4


def test_reward_rerun_resumes_from_the_last_checkpoint(trained):
    cfg, results, _ = trained
    run_cfg = cfg.model_copy(deep=True)
    run_cfg.reward.train_steps = 130  # the first run saved checkpoint-120
    result = reward(run_cfg)
    assert result["resumed_from"] == 120
    assert result["heldout_accuracy"] > 0.75


def test_resume_refuses_a_checkpoint_from_another_config_or_data(make_config, tmp_path):
    """The resume key covers the step's settings and its inputs' digests; a checkpoint
    made under another key is refused with one line naming it."""
    from rlhf_tasks import training
    from rlhf_tasks.errors import BadInput
    from rlhf_tasks.storage import Storage

    cfg = make_config()
    storage = Storage.from_config(cfg)
    data = tmp_path / "data"
    data.mkdir()
    (data / "canonical.parquet").write_bytes(b"rows v1")
    storage.put_dir(data, cfg.step_uri("validate_preference"))
    key = training.resume_key(cfg, storage, "reward", ("validate_preference",))
    longer = cfg.model_copy(deep=True)
    longer.reward.train_steps += 100
    longer.reward.checkpoint_every = 7
    assert training.resume_key(longer, storage, "reward", ("validate_preference",)) == key
    other = cfg.model_copy(deep=True)
    other.reward.learning_rate_multiplier = 2.0
    assert training.resume_key(other, storage, "reward", ("validate_preference",)) != key

    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    (folder / "state.pt").write_bytes(b"state")
    checkpoints = cfg.step_uri("reward", "checkpoints")
    training.upload_checkpoint(storage, folder, checkpoints, 5, key)
    assert training.fetch_latest_checkpoint(storage, checkpoints, tmp_path / "r1", key).name \
        == "checkpoint-5"
    (data / "canonical.parquet").write_bytes(b"rows v2")  # the data changed
    storage.put_dir(data, cfg.step_uri("validate_preference"))
    changed = training.resume_key(cfg, storage, "reward", ("validate_preference",))
    assert changed != key
    with pytest.raises(BadInput, match="made from another config or other data"):
        training.fetch_latest_checkpoint(storage, checkpoints, tmp_path / "r2", changed)


def test_progress_lines_give_count_rate_and_eta(caplog, monkeypatch):
    import logging

    from rlhf_tasks import progress

    clock = iter([0.0, 2.0, 4.0, 10.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False, raising=False)
    meter = progress.Progress(10, "evaluate: rlhf answers", every_s=1.0, unit="prompts")
    with caplog.at_level(logging.INFO, logger="rlhf.progress"):
        meter.update(4)            # t=2: 4 in 2 s -> 2/s, 6 left -> 3 s
        meter.update(1, loss=0.5)  # t=4: 5 in 4 s -> 1.25/s, 5 left -> 4 s
        meter.update(5)            # t=10: done
    assert caplog.messages == [
        "evaluate: rlhf answers: 4/10 prompts (2.00/s, ETA 0m03s)",
        "evaluate: rlhf answers: 5/10 prompts (1.25/s, ETA 0m04s) loss=0.5",
        "evaluate: rlhf answers: 10/10 prompts (1.00/s, ETA 0m00s)"]
    assert progress.eta_text(3725) == "1h02m"


@pytest.mark.parametrize("algorithm", ["rloo", "grpo", "dr_grpo"])
def test_critic_free_algorithms_run_the_step_and_resume(trained, algorithm):
    """The ppo step with an algorithm that trains no value model: stopped after one update
    and run again, it resumes from the checkpoint and finishes; the algorithm is in its
    MLflow params and tags and in the model's summary."""
    import mlflow

    cfg, _, _ = trained
    src = f"{cfg.storage.artifact_root}/{cfg.run.pipeline}/{cfg.run.run_id}"
    run_cfg = cfg.model_copy(deep=True)
    run_cfg.run.run_id = f"critic-free-{algorithm}"
    for step in ("validate_prompt", "reward", "sft"):
        shutil.copytree(f"{src}/{step}", run_cfg.step_uri(step))
    run_cfg.ppo = run_cfg.ppo.model_validate({
        **PPO, "algorithm": algorithm, "samples_per_prompt": 4, "train_steps": 2,
        "checkpoint_every": 1, "batch_size": 8, "num_minibatches": 1, "microbatch_size": 8,
        "ppo_epochs": 1, "response_length": 12})
    assert ppo(run_cfg, stop_after=1)["stopped_early"]
    result = ppo(run_cfg)
    assert (result["updates"], result["resumed_from"]) == (2, 1)
    summary = json.loads(open(f"{result['model_uri']}/ppo_summary.json").read())
    assert summary["algorithm"] == algorithm
    assert summary["settings"]["samples_per_prompt"] == 4
    history = json.loads(open(f"{result['model_uri']}/history.json").read())
    assert "value_loss" not in history[-1] and "policy_loss" in history[-1]
    mlflow.set_tracking_uri(run_cfg.tracking.tracking_uri)
    run = mlflow.get_run(result["mlflow_run_id"])
    assert run.data.params["ppo.algorithm"] == algorithm
    assert run.data.tags["ppo.algorithm"] == algorithm


def test_dpo_tunes_from_the_sft_policy_resumes_and_prefers_the_chosen(trained):
    """The dpo step on the validated pairs, from the SFT policy (its reference): a rerun
    with more steps resumes from the checkpoint; the tuned policy's log-prob margin of
    chosen over rejected grows on the training pairs; IPO through ``loss_type``, with full
    tuning."""
    import mlflow
    from peft import PeftModel

    from rlhf_tasks import models
    from rlhf_tasks.steps.dpo import dpo
    from rlhf_tasks.steps.ppo import starting_policy
    from rlhf_tasks.storage import Storage
    from rlhf_tasks.training import encode_pairs, read_canonical

    cfg, _, tmp = trained
    src = f"{cfg.storage.artifact_root}/{cfg.run.pipeline}/{cfg.run.run_id}"
    run_cfg = cfg.model_copy(deep=True)
    run_cfg.run.run_id = "dpo"
    for step in ("validate_preference", "sft"):
        shutil.copytree(f"{src}/{step}", run_cfg.step_uri(step))
    run_cfg.dpo = run_cfg.dpo.model_validate({"train_steps": 4, "batch_size": 16,
                                              "checkpoint_every": 4,
                                              "learning_rate_multiplier": 20.0})
    first = dpo(run_cfg)
    assert first["steps"] == 4 and not first["resumed_from"]
    run_cfg.dpo.train_steps = 6
    again = dpo(run_cfg)
    assert (again["steps"], again["resumed_from"]) == (6, 4)
    summary = json.loads(open(f"{again['model_uri']}/dpo_summary.json").read())
    assert summary["init_from"] == "sft" and summary["loss_type"] == "sigmoid"
    assert summary["data"] == f"SFT + {again['train_pairs']:,} preference pairs"
    run = mlflow.MlflowClient(run_cfg.tracking.tracking_uri).get_run(again["mlflow_run_id"])
    assert run.data.params["dpo.beta"] == "0.1" and run.data.tags["dpo.init_from"] == "sft"

    # the margin log p(chosen) - log p(rejected), summed over response tokens, before and
    # after, on 64 training pairs
    storage = Storage.from_config(run_cfg)
    tokenizer = models.load_tokenizer(run_cfg)
    frame = read_canonical(run_cfg, storage, "preference").head(64)
    pairs = encode_pairs(models.renderer(run_cfg, tokenizer), frame)
    start = starting_policy(run_cfg, storage, tmp / "dpo-start").eval()
    tuned = PeftModel.from_pretrained(starting_policy(run_cfg, storage, tmp / "dpo-tuned"),
                                      again["model_uri"]).eval()

    def margin(model) -> float:
        total = 0.0
        with torch.no_grad():
            for prompt, chosen, rejected in zip(*pairs.values()):
                for sign, response in ((1, chosen), (-1, rejected)):
                    ids = torch.tensor([prompt + response])
                    logps = model(ids).logits[0, :-1].log_softmax(-1)
                    picked = logps[len(prompt) - 1:].gather(1, ids[0, len(prompt):, None])
                    total += sign * picked.sum().item()
        return total / len(pairs["prompt_ids"])

    assert margin(tuned) > margin(start)
    ipo_cfg = run_cfg.model_copy(deep=True)
    ipo_cfg.run.run_id = "ipo"
    for step in ("validate_preference", "sft"):
        shutil.copytree(f"{src}/{step}", ipo_cfg.step_uri(step))
    # IPO, and full tuning (its reference a frozen copy of the starting policy)
    ipo_cfg.dpo = ipo_cfg.dpo.model_validate({"train_steps": 2, "batch_size": 8,
                                              "loss_type": "ipo", "lora_rank": 0})
    ipo = dpo(ipo_cfg)
    ipo_summary = json.loads(open(f"{ipo['model_uri']}/dpo_summary.json").read())
    assert ipo["steps"] == 2 and ipo_summary["loss_type"] == "ipo"
    assert ipo_summary["kind"] == "full"
