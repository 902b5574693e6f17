"""The RL loop for causal language models, readable top to bottom (after CleanRL's
``ppo.py``): PPO, RLOO, GRPO and Dr. GRPO, which differ only in their advantage estimator
(:mod:`rlhf_tasks.rl.advantages`).

One call, :func:`train`, runs ``settings.train_steps`` updates: set-up (optimizer,
processes, resume) and bookkeeping (timers, metrics, checkpoints) live there, at the
edges; each section of the algorithm is one function:

1. prompts: ``batch_size / samples_per_prompt`` per update over all processes, each
   sampled ``samples_per_prompt`` times (a group), a fixed, seeded order: the data
   position is one integer (:func:`~rlhf_tasks.rl.rollout.prompt_batch`);
2. :func:`~rlhf_tasks.rl.rollout.collect_rollouts`: responses from Hugging Face
   ``generate`` (KV cache, left-padded prompts) with the sampled tokens' log-probs of the
   *sampling* distribution (logits / T);
3. :func:`score_rollouts`: the reference policy's log-probs (the same LoRA model with its
   adapters disabled, or a frozen copy), the value model's values (when the algorithm
   has one) and the reward model's score, in length-bucketed microbatches;
4. :func:`compute_advantages`: normalised score, minus the EOS penalty; per-token KL;
   the algorithm's estimator turns them into advantages (PPO: GAE on the per-token
   rewards, whitened; RLOO / GRPO: the group's samples compared);
5. :func:`~rlhf_tasks.rl.update.update_policy`: ``ppo_epochs`` passes over the batch in
   minibatches (one optimizer step, one gradient all-reduce each) made of microbatches
   (gradient accumulation, cut to their longest response);
6. log ``ppo/*`` metrics (with ``ppo/time/*``: where the update's time went); every
   ``checkpoint_every`` updates save everything needed to resume exactly
   (:mod:`~rlhf_tasks.rl.checkpoints`; the random state is derived from the seed and the
   update number).

Several processes (DDP replicas or FSDP2 shards) are :mod:`~rlhf_tasks.rl.distributed`'s.
Comments tagged [N+ "name"] name the implementation detail of Huang et al. ("The N
Implementation Details of RLHF with PPO", and "The N+ Implementation Details ... TL;DR")
that the line implements; the math lives in :mod:`rlhf_tasks.rl.core`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from rlhf_tasks.generation import collate_prompts
from rlhf_tasks.progress import Progress
from rlhf_tasks.reward_model import sequence_scores
from rlhf_tasks.rl import core
from rlhf_tasks.rl.advantages import estimator
from rlhf_tasks.rl.checkpoints import SHARDS, load_checkpoint, save_checkpoint, trainable_state
from rlhf_tasks.rl.distributed import Processes
from rlhf_tasks.rl.forwards import (PolicyAndValue, adapters_disabled, autocast, disable_dropout,
                                    enable_gradient_checkpointing, response_logits,
                                    token_values)
from rlhf_tasks.rl.models import Models
from rlhf_tasks.rl.rollout import Rollouts, collect_rollouts, cut, prompt_batch
from rlhf_tasks.rl.settings import RLSettings
from rlhf_tasks.rl.update import adamw, update_policy

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    updates: int
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0
    seconds: float = 0.0


def train(models: Models, prompts: list[list[int]], settings: RLSettings, *,
          eos_token_id, pad_token_id: int, device: str | torch.device = "cpu",
          resume_from: Path | None = None, checkpoint_dir: Path | None = None,
          on_checkpoint: Callable[[int, Path], None] | None = None,
          on_metrics: Callable[[int, dict], None] | None = None,
          stop_after: int | None = None, accelerator=None) -> TrainResult:
    """Run ``settings.algorithm``; ``stop_after`` ends early after that many updates (to
    test resuming).  ``eos_token_id``: the stop id, or a list of them (a response ends at
    the first).  ``models`` has a critic exactly when the algorithm needs one."""
    s = settings
    algorithm = estimator(s.algorithm)
    if algorithm.need_critic != (models.critic is not None):
        raise ValueError(f"algorithm {s.algorithm} " + ("needs a value model" if
                         algorithm.need_critic else "trains no value model") +
                         ": build the models with critic=" + str(algorithm.need_critic))
    stop_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if s.gradient_checkpointing:
        enable_gradient_checkpointing(*filter(None, (models.policy, models.critic)))
    for model in filter(None, (models.policy, models.critic, models.reference, models.reward)):
        disable_dropout(model)
    for frozen in filter(None, (models.reference, models.reward)):
        frozen.eval().requires_grad_(False)

    processes = Processes(accelerator, s.strategy)
    processes.shard(models)
    wrapped = PolicyAndValue(models.policy, models.critic)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = adamw(params, s, fused=not processes.sharded)
    # [N+ "Learning rate annealing"]: linear decay to 0 over the updates
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, core.linear_schedule(s.train_steps))
    kl_ctl = core.KLController(s.kl_coef, s.kl_target, s.kl_horizon)
    wrapped, unwrapped, optimizer, device = processes.prepare(wrapped, optimizer, device)
    rank, world = processes.rank, processes.world
    reduce_sum = processes.reduce_sum

    start_update, data_position, history = 0, 0, []
    if resume_from is not None:
        state = load_checkpoint(resume_from, wrapped=unwrapped, optimizer=optimizer,
                                scheduler=scheduler, kl_ctl=kl_ctl, processes=processes)
        start_update, data_position, history = (state["update"], state["data_position"],
                                                state["history"])
        log.info("resumed %s at update %d from %s", s.algorithm, start_update, resume_from)

    started = time.perf_counter()
    last_update = min(s.train_steps, start_update + stop_after) if stop_after else s.train_steps
    update = start_update
    meter = Progress(last_update - start_update, f"{s.algorithm} updates", every_s=0.0)
    for update in range(start_update + 1, last_update + 1):
        tick = time.perf_counter()
        # sampling randomness per (seed, update, rank): the same after a resume, and
        # different on every process of a multi-GPU run
        torch.manual_seed(s.seed * 1_000_003 + update * 1_009 + rank)
        # prompts: ``batch_size / samples_per_prompt`` per process, each process its own
        # share, each prompt ``samples_per_prompt`` times in a row (a group)
        batch_prompts = prompt_batch(prompts, data_position, s.prompts_per_update * world,
                                     s.seed)
        data_position += s.prompts_per_update * world
        rows = [p for p in batch_prompts[rank::world] for _ in range(s.samples_per_prompt)]
        query_ids, query_mask = collate_prompts(rows, pad_token_id, device)

        batch = collect_rollouts(unwrapped, query_ids, query_mask, s, stop_ids,
                                 pad_token_id, device)
        t_rollout = _clock(device)
        scored = score_rollouts(models, unwrapped, batch, s, device)
        t_scoring = _clock(device)
        experience = compute_advantages(batch, scored, s, kl_ctl.value, reduce_sum)
        t_advantages = _clock(device)
        stats = update_policy(wrapped, unwrapped, optimizer, params, batch, experience, s,
                              processes, update, device, loss_tokens=algorithm.loss_tokens)
        scheduler.step()
        t_training = _clock(device)

        seconds = t_training - tick
        # [global batch] the mean KL per response over every process's episodes: the
        # adaptive controller sees the same value everywhere
        kl = experience.kl
        kl_sum = reduce_sum(torch.stack([kl.sum(1).sum(), torch.tensor(
            float(len(kl)), device=kl.device)]).double())
        mean_kl = (kl_sum[0] / kl_sum[1]).item()
        lengths = batch.lengths.float()
        metrics = {
            "reward_mean": experience.scores.mean().item(),
            "reward_std": experience.scores.std().item(),
            "score_raw_mean": scored.raw_scores.mean().item(),
            "kl": mean_kl, "kl_coef": kl_ctl.value,
            **{k: _avg(v) for k, v in stats.items()},
            "response_length": lengths.mean().item(),
            "eos_rate": batch.has_eos.float().mean().item(),
            "tokens_per_s": lengths.sum().item() / seconds,
            "episodes_per_s": len(query_ids) / seconds,
            "learning_rate": scheduler.get_last_lr()[0],
            # where the update's time went (seconds): generation, the reference / value /
            # reward forwards, the advantages, the policy (and value) update
            "time/rollout": t_rollout - tick, "time/scoring": t_scoring - t_rollout,
            "time/advantages": t_advantages - t_scoring, "time/training": t_training - t_advantages,
            "time/update": seconds,
        }
        if experience.values is not None:
            metrics["explained_variance"] = core.explained_variance(
                experience.values, experience.returns, batch.mask)
        # [drift] the KL's trend over the last 5 updates (a policy running away from its
        # reference shows here before it shows in the panel)
        metrics["kl_slope"] = core.slope([h["kl"] for h in history[-4:]] + [mean_kl])
        kl_ctl.update(mean_kl, s.batch_size * world)
        history.append({"update": update, **{k: round(v, 6) for k, v in metrics.items()}})
        if on_metrics is not None:
            on_metrics(update, metrics)
        meter.update(1, update=f"{update}/{s.train_steps}",
                     reward=f"{metrics['reward_mean']:.3f}", kl=f"{mean_kl:.3f}",
                     entropy=f"{metrics['entropy']:.3f}",
                     length=f"{metrics['response_length']:.1f}")

        due = s.checkpoint_every and update % s.checkpoint_every == 0
        if checkpoint_dir is not None and (due or update == last_update):
            folder = checkpoint_dir / f"update-{update:06d}"
            weights = optimizer_state = None
            if processes.sharded:  # every process writes its shards
                processes.save_shards(folder / SHARDS, wrapped, optimizer)
            elif rank == 0:  # the replicas are equal: the first one's are the weights
                weights, optimizer_state = trainable_state(unwrapped), optimizer.state_dict()
            if rank == 0:
                save_checkpoint(folder, update=update, weights=weights,
                                optimizer_state=optimizer_state, scheduler=scheduler,
                                kl_ctl=kl_ctl, data_position=data_position, history=history,
                                strategy=processes.strategy)
            # the first process hands the checkpoint over; under FSDP each its own shards
            if on_checkpoint is not None and (rank == 0 or processes.sharded):
                on_checkpoint(update, folder)
    meter.close()
    return TrainResult(updates=update, history=history, resumed_from=start_update,
                       seconds=time.perf_counter() - started)


# -- the algorithm, one section per function: rollout -> score -> advantages -> update ----
@dataclass
class Scored:
    ref_logprobs: torch.Tensor   # (B, width) the reference's log-probs of the sampled tokens
    values: torch.Tensor | None  # (B, width) the critic's values before each token
    raw_scores: torch.Tensor     # (B,) the reward model's score at the last token


@dataclass
class Experience:
    logprobs: torch.Tensor       # (B, width) the rollout's log-probs, masked
    scores: torch.Tensor         # (B,) normalised, EOS-penalised scores
    kl: torch.Tensor             # (B, width) per-token KL to the reference
    values: torch.Tensor | None  # (B, width) masked; None without a critic
    advantages: torch.Tensor     # (B, width) the estimator's
    returns: torch.Tensor | None  # (B, width) the critic's targets; None without one


def score_rollouts(models: Models, unwrapped, batch: Rollouts, s: RLSettings,
                   device) -> Scored:
    """The reference's log-probs, the critic's values (if any) and the reward model's scores, a
    microbatch of rows at a time (the reference's logits for the whole batch at once
    would be the largest tensor of the update), rows sorted by response length."""
    ref_logprobs = torch.zeros(batch.mask.shape, device=batch.mask.device)
    values = (torch.zeros(batch.mask.shape, device=batch.mask.device)
              if unwrapped.critic is not None else None)
    raw_scores = torch.zeros(len(batch.ids), device=batch.mask.device)
    last_index = batch.width_q + batch.lengths - 1
    with torch.no_grad(), autocast(s, device):
        for rows in torch.argsort(batch.lengths, descending=True).split(s.microbatch_size):
            w, args = cut(batch, rows)
            if models.reference is None:  # the policy's base weights are the reference
                with adapters_disabled(unwrapped.policy):
                    ref_logits = response_logits(unwrapped.policy, *args, w, s.temperature)
            else:
                ref_logits = response_logits(models.reference, *args, w, s.temperature)
            ref_logprobs[rows, :w] = core.selective_logprobs(ref_logits,
                                                             batch.responses[rows, :w])
            del ref_logits
            if values is not None:
                values[rows, :w] = token_values(unwrapped.critic, *args, w)
            if models.reward is None:  # the critic's base weights are the reward model
                with adapters_disabled(unwrapped.critic):
                    raw_scores[rows] = sequence_scores(unwrapped.critic, *args,
                                                       last_index[rows])
            else:
                raw_scores[rows] = sequence_scores(models.reward, *args, last_index[rows])
    return Scored(*(t.clone() if t is not None else None
                    for t in (ref_logprobs, values, raw_scores)))


def compute_advantages(batch: Rollouts, scored: Scored, s: RLSettings, beta: float,
                       reduce: core.Reduce) -> Experience:
    """Scores and per-token KL, then the algorithm's estimator (``reduce`` sums over
    processes)."""
    maskf = batch.maskf
    with torch.no_grad():
        # reward normalisation: the reward step measured mean/std of the score on the
        # starting policy's samples, so rewards start near mean 0, std 1
        scores = (scored.raw_scores - s.score_mean) / s.score_std
        # [N+ "EOS trick"]: a fixed penalty for a response that never ended
        scores = torch.where(batch.has_eos, scores, scores - s.missing_eos_penalty)
        # [Ziegler] the KL to the reference, per token
        logprobs, ref_logprobs = batch.logprobs * maskf, scored.ref_logprobs * maskf
        kl = core.kl_penalty(logprobs, ref_logprobs, s.kl_estimator) * maskf
        values = scored.values * maskf if scored.values is not None else None
        advantages, returns = estimator(s.algorithm).estimate(
            scores, kl, batch.mask, values, beta=beta, group=s.samples_per_prompt,
            settings=s, reduce=reduce)
    return Experience(logprobs=logprobs, scores=scores, kl=kl, values=values,
                      advantages=advantages, returns=returns)


def _clock(device) -> float:
    """``perf_counter`` after the device's queued work is done (CUDA runs asynchronously)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _avg(values: list[float]) -> float:
    return sum(values) / max(1, len(values))
