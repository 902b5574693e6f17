#!/usr/bin/env bash
# A short GPU check of the PPO core (run on a lent GPU machine; see the device tool):
# the PPO unit tests on cuda, then PPO throughput on cuda with a bigger random Llama.
# Needs python3 with torch, transformers and peft (the GPU image has them); pytest is
# carried as wheels in .whl when missing.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
RLHF_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/test_ppo_core.py tests/test_ppo_trainer.py 2>&1 | tail -15
for size in "--hidden 128 --layers 4 --heads 4" "--hidden 1024 --layers 8 --heads 16"; do
  for run in 1 2 3; do
    python3 benchmarks/ppo_throughput.py --impl rlhf --device cuda $size --episodes 512 \
      --batch-size 64 2>&1 | tail -1 | sed "s/^/[$size run $run] /"
  done
done
# peak memory and seconds of one PPO update, fp32 vs bf16 + gradient checkpointing (~0.45B)
python3 benchmarks/ppo_memory.py --runs 3 --device cuda --batch 16 --microbatch 4 2>&1 | tail -4
