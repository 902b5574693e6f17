"""Run by tests/test_ppo_ddp.py under ``torchrun --nproc_per_node 2`` (CPU, gloo)."""

import hashlib
import json
import sys

import torch
from accelerate import Accelerator

from tests.test_ppo_trainer import EOS, PAD, prompts, tiny
from rlhf_tasks.ppo import core
from rlhf_tasks.ppo.trainer import PPOSettings, train

out = sys.argv[1]
accelerator = Accelerator(cpu=True)
rank = accelerator.process_index

# whitening over the global batch: each process holds two rows of a fixed batch, and its
# rows come out as the one-process whitening of the whole batch gives them
values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [2.0, 9.0, 1.0], [5.0, 5.0, 0.0]])
mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 1], [1, 1, 0]])
mine = slice(2 * rank, 2 * rank + 2)
whitened = core.masked_whiten(values[mine], mask[mine],
                              reduce=lambda t: accelerator.reduce(t, reduction="sum"))
whiten_error = (whitened - core.masked_whiten(values, mask)[mine]).abs().max().item()

# count DDP's gradient all-reduces (a comm hook on the model train() prepares)
reduces: list[int] = []
prepare = accelerator.prepare


def counting_prepare(*objects):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    prepared = prepare(*objects)

    def hook(state, bucket):
        reduces.append(bucket.index())
        return allreduce_hook(state, bucket)

    prepared[0].register_comm_hook(None, hook)
    return prepared


accelerator.prepare = counting_prepare
models = tiny(4, "shared")
# the adaptive KL controller with a short horizon, so beta moves every update
settings = PPOSettings(total_updates=3, batch_size=8, num_minibatches=2, microbatch_size=2,
                       ppo_epochs=2, max_new_tokens=5, learning_rate=1e-2, kl_target=1e-3,
                       kl_horizon=20, whiten_rewards=True)
before = {n: p.detach().clone() for n, p in models.policy.named_parameters() if p.requires_grad}
result = train(models, prompts(32), settings, eos_token_id=EOS, pad_token_id=PAD,
               accelerator=accelerator)
digest = hashlib.sha256()
moved = 0
for name, param in sorted(models.policy.named_parameters()):
    if param.requires_grad:
        digest.update(param.detach().numpy().tobytes())
        moved += int(not torch.equal(param, before[name]))
with open(f"{out}/rank{rank}.json", "w") as fh:
    json.dump({"rank": rank, "world": accelerator.num_processes, "updates": result.updates,
               "weights_sha256": digest.hexdigest(), "tensors_moved": moved,
               "reward_mean": result.history[-1]["reward_mean"],
               "betas": [h["kl_coef"] for h in result.history],
               "kls": [h["kl"] for h in result.history], "whiten_error": whiten_error,
               "all_reduces": len(reduces), "buckets": len(set(reduces))}, fh)
