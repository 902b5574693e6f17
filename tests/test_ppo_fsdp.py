"""PPO with its models sharded (``compute.strategy: fsdp``, FSDP2): two CPU processes
(gloo) under ``torchrun``, each holding half of every model.

* one PPO update of a fixed batch split over the two processes gives the losses and the
  weights of one process updating on the whole batch with whole models;
* ``train()`` keeps the adaptive controller's beta equal on both processes, and a run
  stopped after 2 updates resumes from its checkpoint (trainable weights and optimizer
  state gathered whole by the first process) to the weights of 3 updates in one go.
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
