"""What each step held, and for how long: the compute side of the benefit and cost.

``rlhf run STEP`` records, once per step run (the first process of a distributed one),
``<run>/compute/<step>.json``: its wall time, the kind of device (``gpu`` or ``cpu``) and
how many it held (GPUs: one per process, times the processes of every node; CPU: the
cores the process may run on), and the device-hours they make.  Measured, never
configured: the cost model (the gate) prices them with the admin's rates.
"""

from __future__ import annotations

import os
import sys


def devices() -> tuple[str, int]:
    """("gpu", GPUs) when the step ran on CUDA devices, else ("cpu", cores)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch = sys.modules.get("torch")  # a light step never imported it: no GPU held
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return "gpu", max(1, world)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return "cpu", cores * max(1, world)


def record(cfg, step: str, wall_seconds: float) -> dict:
    """The step's compute record, written to the run's artifact store (first process only)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    kind, count = devices()
    entry = {"step": step, "wall_seconds": round(wall_seconds, 3), "device": kind,
             "devices": count, "device_hours": round(wall_seconds * count / 3600.0, 6),
             "measured": True}
    from rlhf_tasks.storage import Storage

    Storage.from_config(cfg).write_json(cfg.step_uri("compute", f"{step}.json"), entry)
    return entry


def read_all(cfg, storage) -> dict[str, dict]:
    """Every step's compute record of this run, by step."""
    import json

    out = {}
    for uri in storage.list(cfg.step_uri("compute")):
        if uri.endswith(".json"):
            entry = json.loads(storage.read_bytes(uri))
            out[entry["step"]] = entry
    return out
