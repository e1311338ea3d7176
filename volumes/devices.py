"""The one place that turns ``auto | cpu | cuda[:N]`` into a torch device."""

from __future__ import annotations

import os

from volumes.errors import VolumesError

__all__ = ["resolve_device"]


def resolve_device(choice: str = "auto", *, distributed: bool = False):
    """``auto``: CUDA when present, else CPU; ``cuda`` without a GPU is an error.

    Args:
        choice: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        distributed: under torchrun, pick this process's GPU (``LOCAL_RANK``) and make it
            current; on CPU, share the machine's cores between the processes of one node
            (``LOCAL_WORLD_SIZE``) instead of each taking all of them.

    Returns:
        ``torch.device``.
    """
    import torch

    if choice not in ("auto", "cpu") and not choice.startswith("cuda"):
        raise VolumesError(f"--device {choice!r}: choose auto, cpu, cuda or cuda:N")
    if choice.startswith("cuda") or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise VolumesError(f"--device {choice}: no CUDA device is available")
        if distributed:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            return torch.device("cuda", local_rank)
        if ":" in choice:
            return torch.device(choice)
        return torch.device("cuda", torch.cuda.current_device())
    if distributed:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if local_world > 1:  # processes on one machine share its cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return torch.device("cpu")


def torchrun_rank(timeout_minutes: float = 30.0) -> tuple[int, int]:
    """``(rank, world_size)`` under torchrun, joining its process group once; ``(0, 1)`` without it.

    The backend is NCCL on CUDA, gloo on CPUs. ``timeout_minutes`` bounds how long a collective
    waits for the slowest rank: batch inference passes a day (one rank may hold a long case),
    pretraining keeps torch's 30 minutes (every step synchronises).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import datetime

    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return dist.get_rank(), dist.get_world_size()
