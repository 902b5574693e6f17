"""Checkpoints of the RL loop: enough to resume exactly (weights, optimizer, scheduler,
KL controller, data position), on one process, on replicas (DDP) or on shards (FSDP2,
whose part each process writes through :class:`~rlhf_tasks.rl.distributed.Processes`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rlhf_tasks.rl import core


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights of a whole (not sharded) model: :func:`gather_weights` first
    under FSDP."""
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters()
            if p.requires_grad}


def weights_digest(module: nn.Module) -> str:
    """sha256 of the trainable weights (by name): equal on every process of a run that
    stayed in step, whatever machine each ran on."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(trainable_state(module).items()):
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
                    kl_ctl: core.KLController, processes=None) -> dict:
    from safetensors.torch import load_file

    from rlhf_tasks.rl.distributed import Processes

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
