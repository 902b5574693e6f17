"""Run by tests/test_ppo_ddp.py under ``torchrun --nproc_per_node 2`` (CPU, gloo)."""

import hashlib
import json
import sys

import torch
from accelerate import Accelerator

from tests.test_ppo_trainer import EOS, PAD, prompts, tiny
from rlhf_tasks.rl import core
from rlhf_tasks.rl.settings import RLSettings
from rlhf_tasks.rl.trainer import train

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


def minibatch_gradient_error() -> float:
    """One token mean over the minibatch across processes: each process holds half of one
    fixed batch (responses of different lengths); the gradient DDP averages equals one
    process's gradient over the whole batch."""
    from dataclasses import fields, replace

    from rlhf_tasks.generation import collate_prompts
    from rlhf_tasks.rl.distributed import Processes
    from rlhf_tasks.rl.forwards import PolicyAndValue
    from rlhf_tasks.rl.rollout import collect_rollouts
    from rlhf_tasks.rl.trainer import compute_advantages, score_rollouts
    from rlhf_tasks.rl.update import update_policy
    from tests.test_ppo_trainer import _GradientRecorder

    torch.manual_seed(0)
    stack = tiny(4, "shared")
    s = RLSettings(batch_size=8, num_minibatches=1, microbatch_size=2, ppo_epochs=1,
                    response_length=8, max_grad_norm=1e9)
    ids, mask = collate_prompts(prompts(8), PAD, "cpu")
    local = PolicyAndValue(stack.policy, stack.critic)
    torch.manual_seed(0)  # the same rollouts on both processes
    batch = collect_rollouts(local, ids, mask, s, [EOS, *range(5, 40)], PAD, "cpu")
    exp = compute_advantages(batch, score_rollouts(stack, local, batch, s, "cpu"), s,
                             s.kl_coef, lambda t: t)
    exp.logprobs = exp.logprobs - 0.3 * batch.maskf
    params = [p for p in local.parameters() if p.requires_grad]
    whole = _GradientRecorder(params)
    update_policy(local, local, whole, params, batch, exp, s, Processes(), 1, "cpu")

    # the longer half on one process, the shorter on the other: unequal token counts
    rows = torch.argsort(batch.lengths, descending=True, stable=True)[4 * rank: 4 * rank + 4]

    def half(obj):
        return replace(obj, **{f.name: getattr(obj, f.name)[rows] for f in fields(obj)
                               if isinstance(getattr(obj, f.name), torch.Tensor)})

    ddp = accelerator.prepare(local)
    shared = _GradientRecorder(params)
    update_policy(ddp, local, shared, params, half(batch), half(exp), s.model_copy(update={"batch_size": 4}),
               Processes(accelerator), 1, "cpu")
    assert batch.lengths.min() < batch.lengths.max(), "responses of different lengths"
    return max((a - b).abs().max().item() for a, b in zip(whole.steps[0], shared.steps[0]))


gradient_error = minibatch_gradient_error()

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
settings = RLSettings(train_steps=3, batch_size=8, num_minibatches=2, microbatch_size=2,
                       ppo_epochs=2, response_length=5, learning_rate=1e-2, kl_target=1e-3,
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
               "gradient_error": gradient_error,
               "all_reduces": len(reduces), "buckets": len(set(reduces))}, fh)
