"""Run by tests/test_ppo_fsdp.py under ``torchrun --nproc_per_node 2`` (CPU, gloo): PPO
with the models sharded by FSDP2 (``strategy="fsdp"``)."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator

from tests.test_ppo_trainer import EOS, PAD, prompts, tiny
from rlhf_tasks.generation import collate_prompts
from rlhf_tasks.rl.checkpoints import weights_digest
from rlhf_tasks.rl.distributed import Processes, gather_weights
from rlhf_tasks.rl.forwards import PolicyAndValue
from rlhf_tasks.rl.rollout import Rollouts, collect_rollouts
from rlhf_tasks.rl.settings import RLSettings
from rlhf_tasks.rl.trainer import Experience, compute_advantages, score_rollouts, train
from rlhf_tasks.rl.update import adamw, update_policy

out = Path(sys.argv[1])
accelerator = Accelerator(cpu=True)  # the process group; FSDP2 itself is torch's
rank, world = accelerator.process_index, accelerator.num_processes
report: dict = {"rank": rank, "world": world}


def numel(module) -> int:
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel()
               for p in module.parameters())


def rows(batch, exp, take):
    return (Rollouts(**{k: (v[take] if isinstance(v, torch.Tensor) else v)
                        for k, v in batch.__dict__.items()}),
            Experience(**{k: v[take] for k, v in exp.__dict__.items()}))


# 1. one PPO update on a fixed batch of 8 episodes: 2 processes with 4 rows each and
# sharded models, against one process with all 8 rows and whole models.  One minibatch,
# one epoch and one row per microbatch make the two the same sum of per-row losses.
s = RLSettings(batch_size=8, num_minibatches=1, microbatch_size=1, ppo_epochs=1,
                response_length=6, learning_rate=1e-2, whiten_rewards=True)
ref = tiny(4, "shared")
ref_wrapped = PolicyAndValue(ref.policy, ref.critic)
query_ids, query_mask = collate_prompts(prompts(8), PAD, "cpu")
torch.manual_seed(0)
batch = collect_rollouts(ref_wrapped, query_ids, query_mask, s, [EOS], PAD, "cpu")
scored = score_rollouts(ref, ref_wrapped, batch, s, "cpu")
exp = compute_advantages(batch, scored, s, 0.05, lambda t: t)
ref_params = [p for p in ref_wrapped.parameters() if p.requires_grad]
before = [p.detach().clone() for p in ref_params]
single = update_policy(ref_wrapped, ref_wrapped, adamw(ref_params, s), ref_params, batch, exp,
                    s, Processes(), 1, "cpu")

sharded = tiny(4, "shared")
total = numel(sharded.policy) + numel(sharded.critic)
processes = Processes(accelerator, "fsdp")
processes.shard(sharded)
report["params_total"], report["params_held"] = total, (numel(sharded.policy)
                                                        + numel(sharded.critic))
wrapped = PolicyAndValue(sharded.policy, sharded.critic)
params = [p for p in wrapped.parameters() if p.requires_grad]
mine = slice(4 * rank, 4 * rank + 4)
part = update_policy(wrapped, wrapped, adamw(params, s, fused=False), params,
                  *rows(batch, exp, mine), s.model_copy(update={"batch_size": 4}), processes, 1, "cpu")
losses = torch.tensor([sum(part["policy_loss"]), sum(part["value_loss"])])
losses = accelerator.reduce(losses, reduction="sum")
report["loss_error"] = (losses - torch.tensor([sum(single["policy_loss"]),
                                               sum(single["value_loss"])])).abs().max().item()
gather_weights(sharded.policy)
gather_weights(sharded.critic)
whole = dict(wrapped.named_parameters())
report["weight_error"] = max((whole[n].detach() - p.detach()).abs().max().item()
                             for n, p in ref_wrapped.named_parameters() if p.requires_grad)
report["moved"] = max((p.detach() - q).abs().max().item() for p, q in zip(ref_params, before))

# 2. train() under FSDP: the adaptive controller's beta is the same on both processes,
# and a run stopped after 2 updates resumes from its sharded checkpoint to the
# weights of 3 updates in one go
settings = RLSettings(train_steps=3, batch_size=4, num_minibatches=2, microbatch_size=2,
                       ppo_epochs=2, response_length=5, learning_rate=1e-2, kl_target=1e-3,
                       kl_horizon=20, checkpoint_every=1, strategy="fsdp")


def run(folder: str, **kwargs):
    models = tiny(4, "shared")
    result = train(models, prompts(32), settings, eos_token_id=EOS, pad_token_id=PAD,
                   accelerator=accelerator, checkpoint_dir=out / folder, **kwargs)
    gather_weights(models.policy)
    return result, weights_digest(models.policy)


straight, report["straight_sha256"] = run("straight")
report["betas"] = [h["kl_coef"] for h in straight.history]
run("stopped", stop_after=2)
resumed, report["resumed_sha256"] = run("resumed",
                                        resume_from=out / "stopped" / "update-000002")
report["resumed_from"] = resumed.resumed_from
report["policy_loss"] = [h["policy_loss"] for h in straight.history]
(out / f"rank{rank}.json").write_text(json.dumps(report))
