"""Run by tests/test_ppo_ddp.py under `accelerate launch --cpu --num_processes 2`."""

import hashlib
import json
import sys

import torch
from accelerate import Accelerator

from tests.test_ppo_trainer import EOS, PAD, prompts, tiny
from rlhf_tasks.ppo.trainer import PPOSettings, train

out = sys.argv[1]
accelerator = Accelerator(cpu=True)
models = tiny(4, "shared")
settings = PPOSettings(total_updates=2, batch_size=8, num_minibatches=2, microbatch_size=2,
                       ppo_epochs=2, max_new_tokens=5, learning_rate=1e-2)
before = {n: p.detach().clone() for n, p in models.policy.named_parameters() if p.requires_grad}
result = train(models, prompts(32), settings, eos_token_id=EOS, pad_token_id=PAD,
               accelerator=accelerator)
digest = hashlib.sha256()
moved = 0
for name, param in sorted(models.policy.named_parameters()):
    if param.requires_grad:
        digest.update(param.detach().numpy().tobytes())
        moved += int(not torch.equal(param, before[name]))
rank = accelerator.process_index
with open(f"{out}/rank{rank}.json", "w") as fh:
    json.dump({"rank": rank, "world": accelerator.num_processes, "updates": result.updates,
               "weights_sha256": digest.hexdigest(), "tensors_moved": moved,
               "reward_mean": result.history[-1]["reward_mean"]}, fh)
