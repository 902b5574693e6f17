"""Several processes at the edges of the RL loop: replicas (DDP through accelerate) or
shards (FSDP2).  The loop asks :class:`Processes` to sum statistics, hold back gradient
sync, run backward and clip, and save and load its part of a checkpoint."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from rlhf_tasks.models import unwrap_peft
from rlhf_tasks.reward_model import backbone_and_head

if TYPE_CHECKING:
    from rlhf_tasks.rl.models import Models

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
        backbone, head = backbone_and_head(model)
        for layer in _decoder_layers(backbone):
            fully_shard(layer)
        fully_shard(backbone)
        fully_shard(head)
        return [backbone, head]

    trained = causal_lm(models.policy)
    if models.critic is not None:
        trained += scorer(models.critic)
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
