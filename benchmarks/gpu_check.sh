#!/usr/bin/env bash
# A short GPU check, for a lent GPU machine (the device tool): the PPO tests on cuda, then
# PPO throughput on cuda against TRL 1.12's PPOTrainer on the same card (alternating runs,
# medians; memory is the GPU's peak allocation), fp32 and bf16 on the wide shape and bf16
# on the default and long-response shapes, each of our runs with the training phase's
# achieved TFLOP/s beside the card's measured matmul peak for the dtype (the static KV
# cache and one update's memory were measured on 2026-11-30: results/). Most wanted first:
# a run past the device tool's limit keeps what was logged.
# Needs python3 with torch (the GPU image has it); transformers, peft, TRL 1.12 and
# datasets travel as wheels in .whl (see the device tool's README) and install into
# /tmp/site.  Every figure is appended to $OUT/gpu_check.log as it comes (a timeout keeps
# what was measured).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-/tmp}/gpu_check.log"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD:${PYTHONPATH:-}"
fi
export PYTHONUNBUFFERED=1
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
python3 -c "import trl; print('trl', trl.__version__)" 2>&1 | tail -1
echo "== PPO tests on cuda"
RLHF_TEST_DEVICE=cuda timeout 90 python3 -m pytest -q -p no:cacheprovider -p no:randomly \
  tests/test_ppo_core.py tests/test_ppo_trainer.py 2>&1 | tail -3
WIDE="--hidden 1024 --layers 8 --heads 16 --episodes 512 --batch-size 64"
for dtype in bf16 fp32; do
  echo "== PPO on cuda, ours vs TRL 1.12, both $dtype (wide model: 1024 x 8 layers, vocab 32000)"
  timeout 170 python3 benchmarks/ppo_throughput.py --compare --runs 3 --trl-python python3 \
    --device cuda --dtype $dtype $WIDE
done
echo "== PPO on cuda, ours vs TRL 1.12, both bf16 (default shape)"
timeout 85 python3 benchmarks/ppo_throughput.py --compare --runs 3 --trl-python python3 \
  --device cuda --dtype bf16 --episodes 512 --batch-size 64
echo "== PPO on cuda, ours vs TRL 1.12, both bf16 (long responses: 96 tokens)"
timeout 85 python3 benchmarks/ppo_throughput.py --compare --runs 3 --trl-python python3 \
  --device cuda --dtype bf16 --response-length 96 --episodes 256 --batch-size 64
} 2>&1 | tee -a "$LOG"
