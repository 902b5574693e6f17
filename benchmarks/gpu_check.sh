#!/usr/bin/env bash
# A short GPU check, for a lent GPU machine (the device tool): the PPO tests on cuda, our
# rollouts with a static KV cache + torch.compile against the dynamic cache, PPO
# throughput on cuda against TRL 1.12's PPOTrainer on the same card (alternating runs,
# medians), then peak memory of one PPO update, fp32 against bf16 + gradient
# checkpointing. Most wanted first: a run past the device tool's limit keeps what was logged.
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
RLHF_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider -p no:randomly \
  tests/test_ppo_core.py tests/test_ppo_trainer.py 2>&1 | tail -6
echo "== our rollouts on cuda: dynamic KV cache vs static cache + torch.compile (wide model, alternating)"
for run in 1 2; do
  for cache in dynamic static; do
    echo -n "run $run $cache: "
    timeout 120 python3 benchmarks/ppo_throughput.py --impl rlhf --device cuda --hidden 1024 \
      --layers 8 --heads 16 --episodes 256 --batch-size 64 --rollout-cache $cache 2>&1 | tail -1
  done
done
echo "== PPO throughput on cuda, ours vs TRL 1.12 (wide model: 1024 x 8 layers, vocab 32000)"
timeout 300 python3 benchmarks/ppo_throughput.py --compare --runs 3 --trl-python python3 \
  --device cuda --hidden 1024 --layers 8 --heads 16 --episodes 512 --batch-size 64
echo "== PPO throughput on cuda, ours vs TRL 1.12 (default small shape, one run each)"
timeout 90 python3 benchmarks/ppo_throughput.py --compare --runs 1 --trl-python python3 \
  --device cuda --episodes 512 --batch-size 64
echo "== one PPO update (~0.45B): fp32 vs bf16 + gradient checkpointing"
timeout 120 python3 benchmarks/ppo_memory.py --runs 3 --device cuda --batch 16 --microbatch 4 2>&1 | tail -4
} 2>&1 | tee -a "$LOG"
