#!/usr/bin/env bash
# A short GPU check, for a lent GPU machine (the device tool), most wanted first (a run
# past the device tool's limit keeps what was logged): the RL tests on cuda; GRPO and RLOO
# (ours, no value model) against TRL 1.16's GRPOTrainer / RLOOTrainer in bf16; ours alone
# in bf16 against fp32 on the wide shape; then PPO against TRL 1.12's PPOTrainer in bf16
# (default, long responses) and on the wide shape in both dtypes. Alternating runs,
# medians of 3; memory is the GPU's peak allocation; each of our runs prints the training
# phase's achieved TFLOP/s beside the card's measured matmul peak for the dtype. (PPO in
# fp32 on the default shape and the static KV cache were measured on 2026-11-30: results/.)
# Needs python3 with torch (the GPU image has it); transformers, peft, datasets and both
# TRLs travel as wheels in .whl (see the device tool's README): every wheel but TRL's
# installs into /tmp/site, TRL 1.12 (the PPOTrainer) into /tmp/trl112 and TRL 1.16 (RLOO,
# GRPO) into /tmp/trl116, each put in front of /tmp/site for its comparisons.  The wheels:
#   pip download --no-deps -d .whl transformers==5.24.0 peft==0.21.2 datasets==5.2.0 \
#     trl==1.12.0 trl==1.16.0 dill multiprocess pydantic==2.14.4 pydantic_core==2.50.5 \
#     annotated_types typing_inspection      (one trl per call: pip takes one version)
# Every figure is appended to $OUT/gpu_check.log as it comes (a timeout keeps what was measured).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-/tmp}/gpu_check.log"
BASE="$PWD:${PYTHONPATH:-}"
if ls .whl/*.whl > /dev/null 2>&1; then
  install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                --upgrade --target "$@" || exit 1; }
  install /tmp/site $(ls .whl/*.whl | grep -v '/trl-')
  install /tmp/trl112 .whl/trl-1.12.*.whl
  install /tmp/trl116 .whl/trl-1.16.*.whl
  BASE="/tmp/site:$PWD"
fi
export PYTHONPATH="/tmp/trl112:$BASE"
export PYTHONUNBUFFERED=1
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
python3 -c "import trl; print('trl', trl.__version__)" 2>&1 | tail -1
echo "== RL tests on cuda"
RLHF_TEST_DEVICE=cuda timeout 90 python3 -m pytest -q -p no:cacheprovider -p no:randomly \
  tests/test_ppo_core.py tests/test_ppo_trainer.py tests/test_rl_algorithms.py 2>&1 | tail -3
DEFAULT="--episodes 512 --batch-size 64"
LONG="--response-length 96 --episodes 256 --batch-size 64"
WIDE="--hidden 1024 --layers 8 --heads 16 --episodes 512 --batch-size 64"
# GRPO and RLOO against TRL 1.16, bf16: $1 the shape's name, the rest its arguments
vs_trl116() {
  local shape=$1; shift
  for algorithm in grpo rloo; do
    echo "== $algorithm on cuda, ours vs TRL 1.16, both bf16 ($shape, k = 4)"
    PYTHONPATH="/tmp/trl116:$BASE" timeout 100 python3 benchmarks/ppo_throughput.py \
      --compare --runs 3 --algorithm $algorithm --device cuda --dtype bf16 "$@"
  done
}
# PPO against TRL 1.12: $1 the shape's name, $2 the dtype, $3 the time limit, the rest the
# shape's arguments
vs_trl112() {
  local shape=$1 dtype=$2 limit=$3; shift 3
  echo "== PPO on cuda, ours vs TRL 1.12, both $dtype ($shape)"
  PYTHONPATH="/tmp/trl112:$BASE" timeout $limit python3 benchmarks/ppo_throughput.py \
    --compare --runs 3 --trl-python python3 --device cuda --dtype $dtype "$@"
}
vs_trl116 "default shape" $DEFAULT
echo "== ours alone on cuda, bf16 against fp32, alternating (wide model: 1024 x 8 layers)"
for run in 1 2 3; do
  for dtype in bf16 fp32; do
    echo -n "run $run $dtype "
    timeout 60 python3 benchmarks/ppo_throughput.py --device cuda --dtype $dtype $WIDE | tail -1
  done
done
vs_trl112 "default shape" bf16 90 $DEFAULT
vs_trl116 "long responses: 96 tokens" $LONG
vs_trl112 "long responses: 96 tokens" bf16 90 $LONG
for dtype in bf16 fp32; do
  vs_trl112 "wide model" $dtype 170 $WIDE
done
} 2>&1 | tee -a "$LOG"
