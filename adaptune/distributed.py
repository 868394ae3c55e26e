"""torchrun / DDP helpers. One process is the degenerate case: rank 0 of 1, no process group."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_spec: str) -> tuple[Dist, torch.device]:
    """Read torchrun's environment, start the process group (NCCL on CUDA, gloo on CPU), pick the device."""
    import torch
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_spec == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    elif device_spec == "cuda" and world_size > 1:
        device = torch.device(f"cuda:{local_rank}")
    else:
        device = parse_device(device_spec)
    check_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank), device


def parse_device(spec: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a torch device.

    Raises:
        RecipeError: Anything else.
    """
    import torch

    from adaptune.errors import RecipeError

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise RecipeError([f"train.device: {spec!r} is not a device; use auto, cpu, cuda or cuda:N"])
    return device


def check_device(device: torch.device) -> None:
    """Raise `RecipeError` (exit 2) for a CUDA device this machine does not have."""
    import torch

    from adaptune.errors import RecipeError

    if device.type != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise RecipeError(
            [
                f"train.device: {device} but torch {torch.__version__} sees no CUDA device here; set train.device: cpu "
                "(or auto)"
            ]
        )
    if device.index is not None and device.index >= count:
        raise RecipeError(
            [f"train.device: {device} but this machine has {count} CUDA device(s); use cuda:0 .. cuda:{count - 1}"]
        )


def barrier(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()


def sum_reducer(d: Dist):
    """A function summing a tensor over processes, or None on one process (for `evaluate`'s ``reduce``)."""
    if not d.enabled:
        return None
    import torch.distributed as dist

    def reduce(t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    return reduce


def teardown(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
