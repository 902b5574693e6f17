"""PPO for causal language models, readable top to bottom (after CleanRL's ``ppo.py``).

One call, :func:`train`, runs ``settings.total_updates`` PPO updates: set-up (optimizer,
DDP, resume) and bookkeeping (timers, metrics, checkpoints) live there, at the edges;
each section of the algorithm is one function:

1. prompts: ``batch_size`` per process (a fixed, seeded order: the data position is one
   integer);
2. :func:`collect_rollouts`: responses from Hugging Face ``generate`` (KV cache,
   left-padded prompts) with the sampled tokens' log-probs of the *sampling*
   distribution (logits / T);
3. :func:`score_rollouts`: the reference policy's log-probs (the same LoRA model with its
   adapters disabled, or a frozen copy), the value model's values and the reward model's
   score, in length-bucketed microbatches;
4. :func:`compute_advantages`: reward = normalised score at the last token - beta * KL per
   token; GAE; whitening over the global batch;
5. :func:`ppo_update`: ``ppo_epochs`` passes over the batch, reshuffled each pass, in
   minibatches (one optimizer step, one gradient all-reduce each) made of microbatches
   (gradient accumulation, cut to their longest response);
6. log ``ppo/*`` metrics (with ``ppo/time/*``: where the update's time went); every
   ``checkpoint_every`` updates save everything needed to resume exactly (weights,
   optimizer, scheduler, data position, KL controller; the random state is derived from
   the seed and the update number).

Comments tagged [N+ "name"] name the implementation detail of Huang et al. ("The N
Implementation Details of RLHF with PPO", and "The N+ Implementation Details ... TL;DR")
that the line implements; the math lives in :mod:`rlhf_tasks.ppo.core`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from rlhf_tasks.config import check_batch_split
from rlhf_tasks.models import unwrap_peft
from rlhf_tasks.ppo import core
from rlhf_tasks.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class PPOSettings:
    total_updates: int = 32
    batch_size: int = 32                # episodes (prompts) per update
    num_minibatches: int = 4            # optimizer steps per PPO epoch
    microbatch_size: int = 8            # forward/backward chunk inside a minibatch
    ppo_epochs: int = 4
    learning_rate: float = 3e-4
    max_grad_norm: float = 1.0
    adam_eps: float = 1e-5              # [N+ "Adam epsilon"] 1e-5, as the baselines use
    gamma: float = 1.0                  # no discount inside a response
    lam: float = 0.95
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    vf_coef: float = 0.1
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    kl_target: float | None = None      # set: adaptive KL controller towards this KL
    kl_horizon: int = 10000
    whiten_rewards: bool = False
    temperature: float = 0.7
    max_new_tokens: int = 32
    missing_eos_penalty: float = 1.0
    score_mean: float = 0.0             # reward normalisation, measured by the reward step
    score_std: float = 1.0
    checkpoint_every: int = 0           # 0: only at the end
    seed: int = 0
    dtype: str = "fp32"                 # autocast precision: fp32 (off), bf16, fp16
    gradient_checkpointing: bool = False
    strategy: str = "ddp"               # several processes: ddp (replicas) or fsdp (shards)
    rollout_cache: str = "dynamic"      # static: preallocated KV cache (compiled on a GPU)

    def __post_init__(self):
        check_batch_split(self.batch_size, self.num_minibatches, self.microbatch_size)
        if self.dtype not in ("fp32", "bf16"):
            from rlhf_tasks.config import FP16_REFUSED

            raise ValueError(FP16_REFUSED if self.dtype == "fp16" else
                             f"unknown dtype {self.dtype!r}; use fp32 or bf16")


@dataclass
class Models:
    """What PPO trains and reads.  ``None`` entries share weights with a trained model:

    * ``reference=None``: the policy is a PEFT model; the reference is the same weights
      with the adapters disabled (no second copy of the base model).
    * ``reward=None``: the critic is a PEFT adapter on the reward model; the reward is the
      critic with its adapters disabled (value model initialised from the reward model,
      as InstructGPT did, at the cost of one base model instead of two).
    """

    policy: nn.Module            # causal LM, trainable
    critic: nn.Module            # sequence-classification model (value head), trainable
    reference: nn.Module | None = None
    reward: nn.Module | None = None


class PolicyAndValue(nn.Module):
    """One module over policy and critic, so DDP wraps (and one optimizer steps) both."""

    def __init__(self, policy: nn.Module, critic: nn.Module):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, ids, mask, positions, width: int, temperature: float):
        return (response_logits(self.policy, ids, mask, positions, width, temperature),
                token_values(self.critic, ids, mask, positions, width))


# -- forward passes ------------------------------------------------------------------------
def response_logits(model, ids, mask, positions, width: int, temperature: float):
    """Logits predicting the last ``width`` tokens, divided by the sampling temperature.

    [N+ "Correct log-probs for temperature"]: rollouts sample from logits / T, so the
    training log-probs must be computed from logits / T too.  ``logits_to_keep`` computes
    the vocabulary projection only for the response positions, not for the prompt.
    """
    length = ids.shape[1]
    keep = torch.arange(length - width - 1, length - 1, device=ids.device)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                   logits_to_keep=keep, use_cache=False).logits.float()
    return logits.div_(temperature) if temperature != 1.0 else logits


def _backbone_and_head(model):
    inner = unwrap_peft(model)
    return getattr(inner, inner.base_model_prefix), inner.score


def token_values(critic, ids, mask, positions, width: int):
    """Per-token values for the last ``width`` positions (the state before each token)."""
    backbone, head = _backbone_and_head(critic)
    hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=positions,
                      use_cache=False).last_hidden_state
    return head(hidden[:, -width - 1:-1]).squeeze(-1).float()


def sequence_scores(model, ids, mask, positions, last_index):
    """The reward model's score read at ``last_index`` (EOS, or the last token)."""
    backbone, head = _backbone_and_head(model)
    hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=positions,
                      use_cache=False).last_hidden_state
    picked = hidden[torch.arange(len(ids), device=ids.device), last_index]
    return head(picked).squeeze(-1).float()


def adapters_disabled(model):
    """Context: the PEFT model's base weights (the reference / the reward model)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def disable_dropout(model: nn.Module) -> None:
    """[N+ "Disable dropout"]: dropout would make the PPO ratio differ from 1 even
    before any update, so it is switched off in every model: ``nn.Dropout`` modules, the
    probabilities models keep as float attributes and pass to ``F.dropout`` themselves
    (OPT's ``self.dropout``, ``attention_dropout``, ``activation_dropout`` ...), and the
    config's."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float) and not isinstance(value, bool):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "attn_pdrop"):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


# -- rollouts --------------------------------------------------------------------------------
def sample_tokens(scores: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """[sampling] One token per row from softmax(``scores``), by inverse transform: a
    uniform draw per row located in the row's cumulative distribution (float64).  The same
    distribution as ``torch.multinomial``, which draws an exponential variate for every
    vocabulary entry of every row (most of a CPU rollout step at a 32k vocabulary).  A
    token of probability 0 is never drawn."""
    cdf = (scores - lse[:, None]).exp().double().cumsum(-1)
    draw = torch.rand(len(cdf), 1, dtype=torch.float64, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, draw, right=True).clamp_max_(cdf.shape[1] - 1)


class _SampledLogprobs:
    """A logits processor that samples the next token itself and records its log-prob.

    It divides the raw logits by T (the sampling distribution), draws the token with
    :func:`sample_tokens` and hands ``generate`` (greedy) a choice it cannot change:
    -inf everywhere but the drawn token.  The log-prob kept is the token's logit minus
    the row's logsumexp: no (batch, vocab) log-softmax is built, and no step's scores are
    kept (as ``output_scores`` would)."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        scores = scores.float() / self.temperature
        lse = torch.logsumexp(scores, dim=-1)
        tokens = sample_tokens(scores, lse)
        self.logprobs.append(scores.gather(-1, tokens).squeeze(-1) - lse)
        return torch.full_like(scores, float("-inf")).scatter_(-1, tokens, 0.0)

    def finish(self) -> torch.Tensor:
        return torch.stack(self.logprobs, 1)


def rollout(policy, query_ids, query_mask, settings: PPOSettings, stop_ids, pad_token_id: int):
    """Sample responses with ``generate``; returns (responses, rollout log-probs).

    [N+ "left padding"]: prompts are left-padded so every response starts at the same
    column; ``generate`` derives position ids from the attention mask so padding does not
    shift positions, and uses the KV cache.  [N+ "sampling"]: plain sampling of logits / T
    (top-k 0, top-p 1, no penalties: the checkpoint's generation_config is ignored), done
    by the recorder, so the log-probs are those of the distribution sampled; ``generate``
    itself runs greedy over the recorder's choice.  Generation stops at any of
    ``stop_ids`` (every EOS of the model, the chat template's end of turn).
    """
    from transformers import LogitsProcessorList

    from rlhf_tasks.generation import checkpoint_defaults_off, decoding_config

    stop_ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
    recorder = _SampledLogprobs(settings.temperature)
    # greedy (temperature 0) here: the recorder samples from logits / T itself
    config = decoding_config(max_new_tokens=settings.max_new_tokens, temperature=0.0,
                             stop_ids=stop_ids, pad_token_id=pad_token_id,
                             cache_implementation=("static" if settings.rollout_cache ==
                                                   "static" else None))
    # no_grad, not inference_mode: FSDP2 keeps the buffers it gathers weights into, and
    # would find them inference tensors in the next training forward
    with torch.no_grad(), checkpoint_defaults_off(policy):
        sequences = policy.generate(input_ids=query_ids, attention_mask=query_mask,
                                    generation_config=config,
                                    logits_processor=LogitsProcessorList([recorder]))
        logprobs = recorder.finish()
    # clones are ordinary tensors again, usable in the training graph
    return sequences[:, query_ids.shape[1]:].clone(), logprobs.clone()


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """[N+ "left padding"] position ids that skip the left padding (0 at the first real token)."""
    return (mask.cumsum(1) - 1).clamp_min(0)


def collate_prompts(prompts: list[list[int]], pad_token_id: int, device):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


# -- checkpoints -----------------------------------------------------------------------------
def _trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights of a whole (not sharded) model: :func:`gather_weights` first
    under FSDP."""
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters()
            if p.requires_grad}


def weights_digest(module: nn.Module) -> str:
    """sha256 of the trainable weights (by name): equal on every process of a run that
    stayed in step, whatever machine each ran on."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(_trainable_state(module).items()):
        digest.update(name.encode())
        digest.update(tensor.float().numpy().tobytes())
    return digest.hexdigest()


SHARDS = "shards"  # the sharded (FSDP) part of a checkpoint: torch.distributed.checkpoint


def save_checkpoint(folder: Path, *, update: int, weights: dict | None,
                    optimizer_state: dict | None, scheduler, kl_ctl: core.KLController,
                    data_position: int, history: list, strategy: str = "ddp") -> Path:
    """Weights in safetensors; optimizer, scheduler, KL controller and data position in a
    torch file.  Random state needs no saving: every update seeds its sampling from
    (seed, update, rank), so a resumed run draws what an uninterrupted one would, on any
    number of processes.  Under FSDP the trainable weights and the optimizer state are
    in ``shards/`` instead, each process having written its own part
    (``Processes.save_shards``), and only the rest is here (``weights`` None)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if weights is not None:
        save_file(weights, str(folder / "trainable.safetensors"))
    torch.save({
        "update": update, "optimizer": optimizer_state, "strategy": strategy,
        "scheduler": scheduler.state_dict(), "kl_controller": kl_ctl.state_dict(),
        "data_position": data_position, "history": history,
    }, folder / "state.pt")
    return folder


def load_checkpoint(folder: Path, *, wrapped: nn.Module, optimizer, scheduler,
                    kl_ctl: core.KLController, processes: "Processes | None" = None) -> dict:
    from safetensors.torch import load_file

    processes = processes or Processes()
    # tensors and plain containers only: a checkpoint read back from the store cannot run
    # code when it is loaded
    state = torch.load(folder / "state.pt", weights_only=True)
    if state.get("strategy", "ddp") != processes.strategy:
        raise ValueError(f"checkpoint {folder} was made under {state.get('strategy', 'ddp')}"
                         f", this run uses {processes.strategy}")
    if processes.sharded:
        processes.load_shards(folder / SHARDS, wrapped, optimizer)
    else:
        weights = load_file(str(folder / "trainable.safetensors"))
        missing = {n for n, p in wrapped.named_parameters() if p.requires_grad} - set(weights)
        if missing:
            raise ValueError(f"checkpoint {folder} lacks {len(missing)} trainable tensors, "
                             f"e.g. {sorted(missing)[0]} (different LoRA settings?)")
        processes.load(wrapped, optimizer, weights, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    kl_ctl.load_state_dict(state["kl_controller"])
    return state


# -- several processes: replicas (DDP) or shards (FSDP2) -------------------------------------
def _decoder_layers(backbone: nn.Module) -> nn.ModuleList:
    for name in ("layers", "h", "blocks"):
        layers = getattr(backbone, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"compute.strategy fsdp: no decoder layers found in "
                     f"{type(backbone).__name__} (looked for .layers, .h, .blocks)")


def shard_models(models: Models) -> list[nn.Module]:
    """[FSDP2] Shard every model over the processes with torch's ``fully_shard``: each
    process keeps 1/N of every weight and gathers one unit's weights just for its forward
    (and backward: gradients are reduce-scattered).  Units: each decoder layer; for a
    causal LM the rest of the model (embeddings, final norm, LM head: the unit
    ``generate``'s forward gathers); for a value / reward model its backbone's rest and
    its head apart, because :func:`token_values` and :func:`sequence_scores` call those
    two directly.  Returns the trained units (for gradient sync)."""
    from torch.distributed.fsdp import fully_shard

    inner = unwrap_peft

    def causal_lm(model):
        lm = inner(model)
        for layer in _decoder_layers(getattr(lm, lm.base_model_prefix)):
            fully_shard(layer)
        fully_shard(lm)
        return [lm]

    def scorer(model):
        backbone, head = _backbone_and_head(model)
        for layer in _decoder_layers(backbone):
            fully_shard(layer)
        fully_shard(backbone)
        fully_shard(head)
        return [backbone, head]

    trained = causal_lm(models.policy) + scorer(models.critic)
    if models.reference is not None:
        causal_lm(models.reference)
    if models.reward is not None:
        scorer(models.reward)
    return trained


def gather_weights(module: nn.Module) -> None:
    """[FSDP2] Make a sharded model whole again (a collective: every process calls it), to
    save it as usual: every shard is replaced by the whole tensor (on the CPU; tied weights
    stay tied), and every FSDP unit gets its own class back, without FSDP's forward hooks.
    The model is not trained again afterwards."""
    whole: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None or not hasattr(param, "full_tensor"):
                continue
            if id(param) not in whole:
                whole[id(param)] = nn.Parameter(param.full_tensor().detach().cpu(),
                                                requires_grad=param.requires_grad)
            sub._parameters[name] = whole[id(param)]
    for sub in module.modules():
        cls = type(sub)
        if hasattr(cls, "_orig_cls_mro_index"):  # fully_shard made it an FSDP<cls>
            sub.__class__ = cls.__mro__[cls._orig_cls_mro_index]
            for hooks in (sub._forward_pre_hooks, sub._forward_hooks,
                          sub._forward_pre_hooks_with_kwargs, sub._forward_hooks_with_kwargs,
                          sub._forward_hooks_always_called):
                hooks.clear()


class Processes:
    """This process and the others, at the edges of the loop: alone; DDP replicas
    through accelerate (gradients all-reduced once per minibatch); or FSDP2 shards
    (``strategy="fsdp"``: :func:`shard_models`; accelerate only sets up the process
    group).  The loop asks it to sum statistics over processes, to hold back gradient
    sync, to run backward and clip, and to save and load what a checkpoint holds."""

    def __init__(self, accelerator=None, strategy: str = "ddp"):
        if strategy not in ("ddp", "fsdp"):
            raise ValueError(f"unknown strategy {strategy!r}; use 'ddp' or 'fsdp'")
        self.accelerator, self.strategy = accelerator, strategy
        self.rank, self.world = ((accelerator.process_index, accelerator.num_processes)
                                 if accelerator is not None else (0, 1))
        self.sharded = strategy == "fsdp" and self.world > 1
        self.units: list[nn.Module] = []

    def shard(self, models: Models) -> None:
        if self.sharded:
            self.units = shard_models(models)

    def prepare(self, wrapped, optimizer, device):
        """(wrapped, unwrapped, optimizer, device) as the loop uses them."""
        if self.accelerator is None:
            return wrapped, wrapped, optimizer, device
        if self.sharded:
            return wrapped, wrapped, optimizer, self.accelerator.device
        wrapped, optimizer = self.accelerator.prepare(wrapped, optimizer)
        return (wrapped, self.accelerator.unwrap_model(wrapped), optimizer,
                self.accelerator.device)

    def gather_objects(self, obj) -> list:
        """Every process's ``obj`` (picklable), in rank order: a collective."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        every = [None] * self.world
        dist.all_gather_object(every, obj)
        return every

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """[global batch] the sum over every process (whitening, KL): each process then
        holds the statistics of the whole batch, so beta stays the same everywhere."""
        return self.accelerator.reduce(tensor, reduction="sum") if self.world > 1 else tensor

    @contextlib.contextmanager
    def _fsdp_no_sync(self):
        for unit in self.units:
            unit.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            for unit in self.units:
                unit.set_requires_gradient_sync(True)

    def no_sync(self, wrapped, last: bool):
        """Gradients stay local on every microbatch but a minibatch's last."""
        if last or self.world == 1:
            return contextlib.nullcontext()
        return self._fsdp_no_sync() if self.sharded else self.accelerator.no_sync(wrapped)

    def backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is not None and not self.sharded:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def clip(self, params, max_norm: float) -> None:
        if self.accelerator is not None and not self.sharded:
            self.accelerator.clip_grad_norm_(params, max_norm)
        else:  # FSDP2's gradients are DTensors: the norm is the global one
            nn.utils.clip_grad_norm_(params, max_norm)

    def load(self, wrapped, optimizer, weights: dict, optimizer_state: dict) -> None:
        wrapped.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(optimizer_state)

    @staticmethod
    def _sharded_state(wrapped, optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model, optim = get_state_dict(wrapped, optimizer,
                                      options=StateDictOptions(ignore_frozen_params=True))
        return {"model": model, "optim": optim}

    def save_shards(self, folder: Path, wrapped, optimizer) -> None:
        """[FSDP] every process writes its shards of the trainable weights and of the
        optimizer state (torch.distributed.checkpoint; the first also the index): no
        process ever holds the whole."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._sharded_state(wrapped, optimizer), checkpoint_id=str(folder))

    def load_shards(self, folder: Path, wrapped, optimizer) -> None:
        """[FSDP] every process reads its own shards back, whatever wrote them."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = self._sharded_state(wrapped, optimizer)
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(wrapped, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))


# -- the loop --------------------------------------------------------------------------------
@dataclass
class TrainResult:
    updates: int
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0
    seconds: float = 0.0


def prompt_batch(prompts: list[list[int]], position: int, size: int, seed: int
                 ) -> list[list[int]]:
    """The next ``size`` prompts of a seeded order that reshuffles every pass over the data."""
    out = []
    n = len(prompts)
    while len(out) < size:
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = order[offset: offset + size - len(out)].tolist()
        out += [prompts[i] for i in take]
        position += len(take)
    return out


def autocast(settings: PPOSettings, device) -> contextlib.AbstractContextManager:
    """Mixed precision for forward passes: weights that train stay fp32 (master copies)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.dtype)
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=dtype) if dtype else contextlib.nullcontext()


def enable_gradient_checkpointing(*modules: nn.Module) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant: works with
    frozen inputs and LoRA)."""
    for module in modules:
        inner = unwrap_peft(module)
        inner.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})


def train(models: Models, prompts: list[list[int]], settings: PPOSettings, *,
          eos_token_id, pad_token_id: int, device: str | torch.device = "cpu",
          resume_from: Path | None = None, checkpoint_dir: Path | None = None,
          on_checkpoint: Callable[[int, Path], None] | None = None,
          on_metrics: Callable[[int, dict], None] | None = None,
          stop_after: int | None = None, accelerator=None) -> TrainResult:
    """Run PPO; ``stop_after`` ends early after that many updates (to test resuming).
    ``eos_token_id``: the stop id, or a list of them (a response ends at the first)."""
    s = settings
    stop_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if s.gradient_checkpointing:
        enable_gradient_checkpointing(models.policy, models.critic)
    for model in filter(None, (models.policy, models.critic, models.reference, models.reward)):
        disable_dropout(model)
    for frozen in filter(None, (models.reference, models.reward)):
        frozen.eval().requires_grad_(False)

    processes = Processes(accelerator, s.strategy)
    processes.shard(models)
    wrapped = PolicyAndValue(models.policy, models.critic)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = _adamw(params, s, fused=not processes.sharded)
    # [N+ "Learning rate annealing"]: linear decay to 0 over the updates
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, core.linear_schedule(s.total_updates))
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
        log.info("resumed PPO at update %d from %s", start_update, resume_from)

    started = time.perf_counter()
    last_update = min(s.total_updates, start_update + stop_after) if stop_after else s.total_updates
    update = start_update
    meter = Progress(last_update - start_update, "ppo updates", every_s=0.0)
    for update in range(start_update + 1, last_update + 1):
        tick = time.perf_counter()
        # sampling randomness per (seed, update, rank): the same after a resume, and
        # different on every process of a multi-GPU run
        torch.manual_seed(s.seed * 1_000_003 + update * 1_009 + rank)
        # prompts: ``batch_size`` per process, each process its own share
        batch_prompts = prompt_batch(prompts, data_position, s.batch_size * world, s.seed)
        data_position += s.batch_size * world
        query_ids, query_mask = collate_prompts(batch_prompts[rank::world], pad_token_id, device)

        batch = collect_rollouts(unwrapped, query_ids, query_mask, s, stop_ids,
                                 pad_token_id, device)
        t_rollout = _clock(device)
        scored = score_rollouts(models, unwrapped, batch, s, device)
        t_scoring = _clock(device)
        experience = compute_advantages(batch, scored, s, kl_ctl.value, reduce_sum)
        t_advantages = _clock(device)
        stats = ppo_update(wrapped, unwrapped, optimizer, params, batch, experience, s,
                           processes, update, device)
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
            "explained_variance": core.explained_variance(experience.values,
                                                          experience.returns, batch.mask),
            "response_length": lengths.mean().item(),
            "eos_rate": batch.has_eos.float().mean().item(),
            "tokens_per_s": lengths.sum().item() / seconds,
            "episodes_per_s": len(query_ids) / seconds,
            "learning_rate": scheduler.get_last_lr()[0],
            # where the update's time went (seconds): generation, the reference / value /
            # reward forwards, rewards + GAE + whitening, the PPO epochs
            "time/rollout": t_rollout - tick, "time/scoring": t_scoring - t_rollout,
            "time/advantages": t_advantages - t_scoring, "time/training": t_training - t_advantages,
            "time/update": seconds,
        }
        # [drift] the KL's trend over the last 5 updates (a policy running away from its
        # reference shows here before it shows in the panel)
        metrics["kl_slope"] = core.slope([h["kl"] for h in history[-4:]] + [mean_kl])
        kl_ctl.update(mean_kl, s.batch_size * world)
        history.append({"update": update, **{k: round(v, 6) for k, v in metrics.items()}})
        if on_metrics is not None:
            on_metrics(update, metrics)
        meter.update(1, update=f"{update}/{s.total_updates}",
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
                weights, optimizer_state = _trainable_state(unwrapped), optimizer.state_dict()
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
class Rollouts:
    """One update's episodes on this process: prompt + response token ids and masks."""

    ids: torch.Tensor            # (B, width_q + width): prompt (left-padded) + response
    full_mask: torch.Tensor
    positions: torch.Tensor
    responses: torch.Tensor      # (B, width), padded after the first stop token
    logprobs: torch.Tensor       # (B, width) log-probs the rollout sampled with
    mask: torch.Tensor           # (B, width) 1 up to and including the stop token
    has_eos: torch.Tensor        # (B,) the response ended
    lengths: torch.Tensor        # (B,) response tokens kept
    width_q: int

    @property
    def maskf(self) -> torch.Tensor:
        return self.mask.float()


@dataclass
class Scored:
    ref_logprobs: torch.Tensor   # (B, width) the reference's log-probs of the sampled tokens
    values: torch.Tensor         # (B, width) the critic's values before each token
    raw_scores: torch.Tensor     # (B,) the reward model's score at the last token


@dataclass
class Experience:
    logprobs: torch.Tensor       # (B, width) the rollout's log-probs, masked
    scores: torch.Tensor         # (B,) normalised, EOS-penalised scores
    kl: torch.Tensor             # (B, width) per-token KL to the reference
    values: torch.Tensor         # (B, width) masked
    advantages: torch.Tensor     # (B, width) whitened
    returns: torch.Tensor        # (B, width)


def collect_rollouts(unwrapped, query_ids, query_mask, s: PPOSettings, stop_ids,
                     pad_token_id: int, device) -> Rollouts:
    """Sample one response per prompt (policy and value model in eval mode until the
    update: dropout is off anyway).

    [N+ "Truncate at EOS"]: tokens after the first stop token are padding; a response
    that never stops keeps all its tokens (and is penalised in ``compute_advantages``)."""
    unwrapped.eval()
    with autocast(s, device):
        responses, logprobs = rollout(unwrapped.policy, query_ids, query_mask, s, stop_ids,
                                      pad_token_id)
    mask, has_eos = core.response_mask(responses, stop_ids)
    responses = responses.masked_fill(mask == 0, pad_token_id)
    full_mask = torch.cat([query_mask, mask], 1)
    return Rollouts(ids=torch.cat([query_ids, responses], 1), full_mask=full_mask,
                    positions=position_ids(full_mask), responses=responses,
                    logprobs=logprobs, mask=mask, has_eos=has_eos, lengths=mask.sum(1),
                    width_q=query_ids.shape[1])


def _cut(batch: Rollouts, rows: torch.Tensor) -> tuple[int, tuple]:
    """[length buckets] ``rows`` cut to their longest response: (that width, the inputs)."""
    w = max(int(batch.lengths[rows].max()), 1)
    cols = batch.width_q + w
    return w, (batch.ids[rows, :cols], batch.full_mask[rows, :cols],
               batch.positions[rows, :cols])


def score_rollouts(models: Models, unwrapped, batch: Rollouts, s: PPOSettings,
                   device) -> Scored:
    """The reference's log-probs, the critic's values and the reward model's scores, a
    microbatch of rows at a time (the reference's logits for the whole batch at once
    would be the largest tensor of the update), rows sorted by response length."""
    ref_logprobs = torch.zeros(batch.mask.shape, device=batch.mask.device)
    values = torch.zeros(batch.mask.shape, device=batch.mask.device)
    raw_scores = torch.zeros(len(batch.ids), device=batch.mask.device)
    last_index = batch.width_q + batch.lengths - 1
    with torch.no_grad(), autocast(s, device):
        for rows in torch.argsort(batch.lengths, descending=True).split(s.microbatch_size):
            w, args = _cut(batch, rows)
            if models.reference is None:  # the policy's base weights are the reference
                with adapters_disabled(unwrapped.policy):
                    ref_logits = response_logits(unwrapped.policy, *args, w, s.temperature)
            else:
                ref_logits = response_logits(models.reference, *args, w, s.temperature)
            ref_logprobs[rows, :w] = core.selective_logprobs(ref_logits,
                                                             batch.responses[rows, :w])
            del ref_logits
            values[rows, :w] = token_values(unwrapped.critic, *args, w)
            if models.reward is None:  # the critic's base weights are the reward model
                with adapters_disabled(unwrapped.critic):
                    raw_scores[rows] = sequence_scores(unwrapped.critic, *args,
                                                       last_index[rows])
            else:
                raw_scores[rows] = sequence_scores(models.reward, *args, last_index[rows])
    return Scored(*(t.clone() for t in (ref_logprobs, values, raw_scores)))


def compute_advantages(batch: Rollouts, scored: Scored, s: PPOSettings, beta: float,
                       reduce: core.Reduce) -> Experience:
    """Rewards, GAE and whitening over the global batch (``reduce`` sums over processes)."""
    maskf = batch.maskf
    with torch.no_grad():
        # reward normalisation: the reward step measured mean/std of the score on the
        # reference policy's samples, so rewards start near mean 0, std 1
        scores = (scored.raw_scores - s.score_mean) / s.score_std
        # [N+ "EOS trick"]: a fixed penalty for a response that never ended
        scores = torch.where(batch.has_eos, scores, scores - s.missing_eos_penalty)
        # [Ziegler] score at the last token minus beta * per-token KL
        logprobs, ref_logprobs = batch.logprobs * maskf, scored.ref_logprobs * maskf
        kl = core.kl_penalty(logprobs, ref_logprobs, s.kl_estimator) * maskf
        rewards = core.token_rewards(scores, kl, beta, batch.mask)
        if s.whiten_rewards:  # [N+ "Reward whitening"] (scale only)
            rewards = core.masked_whiten(rewards, batch.mask, shift_mean=False, reduce=reduce)
        values = scored.values * maskf
        advantages, returns = core.gae(rewards, values, batch.mask, s.gamma, s.lam)
        # [N+ "Advantage whitening"] over the global batch's response tokens
        advantages = core.masked_whiten(advantages, batch.mask, reduce=reduce)
    return Experience(logprobs=logprobs, scores=scores, kl=kl, values=values,
                      advantages=advantages, returns=returns)


def ppo_update(wrapped, unwrapped, optimizer, params, batch: Rollouts, exp: Experience,
               s: PPOSettings, processes: Processes, update: int,
               device) -> dict[str, list[float]]:
    """``ppo_epochs`` passes over the batch: a fresh permutation each epoch, minibatches
    (one optimizer step each, global-norm clipping), microbatches (gradient accumulation,
    [length buckets] longest first, each cut to its longest response: the same gradient).
    The loss is one token mean over the minibatch's tokens on every process, so a token
    weighs the same whatever the microbatch size and the number of processes.
    Gradients all-reduce once per minibatch (``no_sync`` on the other microbatches)."""
    unwrapped.train()
    stats: dict[str, list[float]] = {k: [] for k in (
        "policy_loss", "value_loss", "policy_clipfrac", "value_clipfrac", "approx_kl",
        "entropy", "ratio")}
    maskf = batch.maskf
    local = len(batch.ids)
    minibatch = s.batch_size // s.num_minibatches
    micro = min(s.microbatch_size, minibatch)
    shuffle = torch.Generator().manual_seed(s.seed * 7919 + update)
    for epoch in range(s.ppo_epochs):
        order = torch.randperm(local, generator=shuffle)
        for start in range(0, local, minibatch):
            mb_rows = order[start: start + minibatch]
            mb_rows = mb_rows[torch.argsort(batch.lengths[mb_rows].cpu(), descending=True,
                                            stable=True)]
            optimizer.zero_grad(set_to_none=True)
            # one token mean over the whole minibatch, on every process: the token count
            # is summed over processes, and DDP / FSDP average the processes' gradients,
            # so each process divides its token sum by (all tokens / processes)
            tokens = processes.reduce_sum(maskf[mb_rows].sum().double()).float() \
                / processes.world
            for m_start in range(0, len(mb_rows), micro):
                rows = mb_rows[m_start: m_start + micro]
                w, args = _cut(batch, rows)
                m = maskf[rows, :w]
                last = m_start + micro >= len(mb_rows)
                with processes.no_sync(wrapped, last):
                    with autocast(s, device):
                        new_logits, new_values = wrapped(*args, w, s.temperature)
                    if epoch == 0:  # entropy once per update: every row once
                        stats["entropy"].append(_entropy(new_logits, m))
                    # the backward pass overwrites the logits with their gradient
                    new_logprobs = core.selective_logprobs(new_logits, batch.responses[rows, :w],
                                                           consume=True)
                    pg_loss, pg_stats = core.policy_loss(
                        new_logprobs, exp.logprobs[rows, :w], exp.advantages[rows, :w], m,
                        s.clip_range, tokens=tokens)
                    vf_loss, vf_stats = core.value_loss(
                        new_values, exp.values[rows, :w], exp.returns[rows, :w], m,
                        s.value_clip_range, tokens=tokens)
                    loss = pg_loss + s.vf_coef * vf_loss
                    processes.backward(loss)
                with torch.no_grad():
                    stats["policy_loss"].append(pg_stats["loss"].item())
                    stats["value_loss"].append(vf_stats["loss"].item())
                    stats["policy_clipfrac"].append(pg_stats["clipfrac"].item())
                    stats["value_clipfrac"].append(vf_stats["clipfrac"].item())
                    stats["approx_kl"].append(pg_stats["approx_kl"].item())
                    stats["ratio"].append(pg_stats["ratio"].item())
                # free this microbatch's logits before the next forward allocates its own
                del new_logits, new_values, new_logprobs, loss
            processes.clip(params, s.max_grad_norm)
            optimizer.step()
    return stats


def _entropy(logits: torch.Tensor, mask: torch.Tensor) -> float:
    """The policy's mean entropy over the masked positions, a few rows at a time (softmax
    temporaries the size of the logits otherwise); no gradient."""
    with torch.no_grad():
        entropy = torch.cat([core.entropy_from_logits(chunk) for chunk in logits.split(2)])
        return core.masked_mean(entropy, mask).item()


def _clock(device) -> float:
    """``perf_counter`` after the device's queued work is done (CUDA runs asynchronously)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _adamw(params, s: PPOSettings, fused: bool = True):
    """AdamW, fused (one kernel for all parameters) where torch supports it on the device
    (not for FSDP2's sharded parameters)."""
    if not fused:
        return torch.optim.AdamW(params, lr=s.learning_rate, eps=s.adam_eps, weight_decay=0.0)
    try:
        return torch.optim.AdamW(params, lr=s.learning_rate, eps=s.adam_eps, weight_decay=0.0,
                                 fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=s.learning_rate, eps=s.adam_eps, weight_decay=0.0)


def _avg(values: list[float]) -> float:
    return sum(values) / max(1, len(values))
