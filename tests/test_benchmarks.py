"""The RL benchmark script still runs, and its accounting measures something real.

Its figures are quoted in docs/SCALING.md and in closing notes; nothing else runs it in
CI. TRL 1.12's PPO side needs its own environment (``make bench-trl-venv``) and is not
run here; TRL 1.16's GRPO side is this environment's and is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB, HIDDEN = 4096, 64
SHAPE = ["--vocab", str(VOCAB), "--hidden", str(HIDDEN), "--layers", "1", "--heads", "2",
         "--episodes", "8", "--batch-size", "8", "--num-minibatches", "2",
         "--ppo-epochs", "1", "--response-length", "4", "--prompt-length", "6"]


def _last_line(*extra: str) -> dict[str, float]:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ppo_throughput.py"),
                           "--impl", "rlhf", *SHAPE, *extra], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    return {k: float(v) for k, v in (kv.split("=") for kv in last.split())}


def _llama_params(vocab: int, hidden: int, layers: int, lm_head: bool) -> int:
    """Parameters of the benchmark's random Llama (untied head, MLP 4x hidden, one-label
    score head instead of the LM head for a sequence classifier)."""
    per_layer = 4 * hidden * hidden + 3 * hidden * 4 * hidden + 2 * hidden
    head = vocab * hidden if lm_head else hidden
    return vocab * hidden + layers * per_layer + hidden + head


def test_the_timed_run_prints_its_figures():
    fields = _last_line()
    assert fields["episodes_per_s"] > 0 and fields["peak_rss_mb"] > 100


def test_the_accounting_sees_every_tensor_and_matmul_the_run_must_hold():
    fields = _last_line("--account")
    causal = _llama_params(VOCAB, HIDDEN, 1, lm_head=True)     # 590,016
    scorer = _llama_params(VOCAB, HIDDEN, 1, lm_head=False)    # 327,936
    # four fp32 models; policy and value also hold a gradient and two AdamW moments
    floor_mb = 4 * (2 * causal + 2 * scorer + 3 * (causal + scorer)) / 2**20   # 17.5 MB
    assert fields["peak_tensor_mb"] >= int(floor_mb)
    # the one PPO epoch alone: forward and backward through a linear layer cost 6 FLOPs
    # per weight per token; the decoder layer of policy and value sees every token (3 to
    # 6 of prompt, 4 of response), the LM head the 4 response positions
    layer = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * 4 * HIDDEN
    assert fields["gflop_per_episode"] * 1e9 >= 6 * (2 * layer * 7 + VOCAB * HIDDEN * 4)
    assert fields["rss_floor_mb"] > fields["peak_tensor_mb"]


def test_the_critic_free_comparison_runs_both_sides_on_the_same_work():
    """``--algorithm grpo --compare``: ours and TRL 1.16's GRPOTrainer (this environment's
    TRL), one run each, and the ratio line."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ppo_throughput.py"),
                           "--compare", "--runs", "1", "--algorithm", "grpo",
                           "--samples-per-prompt", "4", *SHAPE], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert any(line.startswith("run 1 rlhf episodes_per_s=") for line in lines), lines
    assert any(line.startswith("run 1 trl  episodes_per_s=") for line in lines), lines
    assert any(line.startswith("median of 1: rlhf ") and "| trl-1.16.0 " in line
               for line in lines), lines
    assert any(line.startswith("speed ratio ") and "memory ratio" in line for line in lines)
