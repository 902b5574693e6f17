"""PPO data-parallel through accelerate: two CPU processes (gloo) stay in step, and the
batch statistics (KL for the adaptive controller, whitening) are the global batch's.

Launched with ``torchrun`` (what ``accelerate launch --multi_gpu`` runs underneath; on CPU
this accelerate version starts a single process), the worker uses ``Accelerator`` as the
``ppo`` step does under ``WORLD_SIZE`` > 1.
"""

import json
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_two_processes_train_in_sync(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(port), "-m", "tests.ddp_ppo_worker", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["tensors_moved"] > 0
    # DDP averages the gradients, so both copies of the policy end identical ...
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    # ... while each process rolled out its own prompts
    assert ranks[0]["reward_mean"] != ranks[1]["reward_mean"]
    # the KL statistic is the global batch's: the adaptive controller moved beta by the
    # same steps on both processes
    assert ranks[0]["kls"] == ranks[1]["kls"]
    assert ranks[0]["betas"] == ranks[1]["betas"]
    assert len(set(ranks[0]["betas"])) == 3, ranks[0]["betas"]  # beta moved every update
    # no_sync on every microbatch but a minibatch's last: one all-reduce per optimizer step
    # (3 updates x 2 epochs x 2 minibatches), not one per microbatch (twice as many)
    assert ranks[0]["all_reduces"] == 12 * ranks[0]["buckets"], ranks[0]
    # whitening over the global batch: each process's rows as one process whitens them all
    assert ranks[0]["whiten_error"] < 1e-6 and ranks[1]["whiten_error"] < 1e-6
    # one token mean over the minibatch's tokens on both processes together: the averaged
    # gradient of two halves of a batch is one process's gradient of the whole batch
    assert ranks[0]["gradient_error"] < 1e-6 and ranks[1]["gradient_error"] < 1e-6, ranks
