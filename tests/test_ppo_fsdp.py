"""PPO with its models sharded (``compute.strategy: fsdp``, FSDP2): two CPU processes
(gloo) under ``torchrun``, each holding half of every model.

* one PPO update of a fixed batch split over the two processes gives the losses and the
  weights of one process updating on the whole batch with whole models;
* ``train()`` keeps the adaptive controller's beta equal on both processes, and a run
  stopped after 2 updates resumes from its sharded checkpoint (each process wrote and
  reads back its own shards of the trainable weights and optimizer state) to the weights
  of 3 updates in one go.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_sharded_ppo_matches_one_process_and_resumes(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(free_port()), "-m", "tests.fsdp_ppo_worker", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["world"] == 2
        # each process holds about half of the policy's and the value model's weights
        assert abs(r["params_held"] / r["params_total"] - 0.5) < 0.01, r
        # the same update as one process with whole models: summed per-episode losses
        # equal, weights within 1e-6 after a step that moved them by about 1e-2
        assert r["loss_error"] < 1e-5, r
        assert r["weight_error"] < 1e-6 and r["moved"] > 1e-3, r
        assert r["resumed_from"] == 2
        assert r["resumed_sha256"] == r["straight_sha256"]
    assert ranks[0]["params_held"] + ranks[1]["params_held"] == ranks[0]["params_total"]
    assert ranks[0]["betas"] == ranks[1]["betas"] and len(set(ranks[0]["betas"])) == 3
    assert ranks[0]["straight_sha256"] == ranks[1]["straight_sha256"]
    # each process trained on its own episodes
    assert ranks[0]["policy_loss"] != ranks[1]["policy_loss"]


def test_the_trl_trainers_shard_through_accelerate(make_config, monkeypatch, tmp_path):
    """reward and sft: ``compute.strategy: fsdp`` on several GPU processes becomes the
    Trainer's FSDP2 settings, from which it builds accelerate's FSDP plugin; one process,
    or CPU processes (accelerate shards on GPUs only), keep the plain settings."""
    from transformers import TrainingArguments

    from rlhf_tasks import training

    cfg = make_config()
    cfg.compute.strategy, cfg.compute.gradient_checkpointing = "fsdp", True
    plain = {"activation_checkpointing": True,
             "activation_checkpointing_kwargs": {"use_reentrant": False}}
    assert training.sharding_args(cfg, "cuda") == plain  # one process: nothing to shard
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert training.sharding_args(cfg, "cpu") == plain
    args = training.sharding_args(cfg, "cuda")
    assert args["activation_checkpointing"] is False  # FSDP's own checkpointing instead
    built = TrainingArguments(output_dir=str(tmp_path), report_to="none", **args)
    assert built.fsdp_plugin_args == {
        "fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "cpu_ram_efficient_loading": False, "state_dict_type": "SHARDED_STATE_DICT",
        "activation_checkpointing": True, "reshard_after_forward": True}
    cfg.compute.strategy = "ddp"
    assert training.sharding_args(cfg, "cuda") == plain
