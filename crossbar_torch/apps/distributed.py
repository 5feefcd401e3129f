"""The one rank helper of the applications: which process this is (:func:`rank_world`), joining
the process group under ``torchrun`` (:func:`init_distributed`), and the ``--device`` value as
a device (:func:`resolve_device`). Evaluation, fine-tuning and the frontier all ask here."""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

from ..errors import UsageError

__all__ = ["rank_world", "dist_rank_world", "init_distributed", "resolve_device"]


def rank_world():
    """(rank, world size) of the default process group, (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


dist_rank_world = rank_world  # the name evaluate.py exported


def resolve_device(arg: Optional[str] = None, local_rank: Optional[int] = None) -> torch.device:
    """``--device`` value (cpu / cuda / cuda:N; default cuda if available) as a device.

    Under ``torchrun`` with CUDA, a bare ``cuda`` (or the default) means ``cuda:LOCAL_RANK``.
    """
    if arg is None:
        arg = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(arg)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {arg}: unknown device; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {arg}: the crossbar ops run on cpu or cuda only; use cpu, "
                         "cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {arg}: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", local_rank or 0)
    return dev


def init_distributed(device_arg: Optional[str] = None):
    """Join the process group when launched by ``torchrun`` (RANK / WORLD_SIZE in the env).

    Backend nccl on CUDA, gloo on CPU; the device is ``cuda:LOCAL_RANK`` on CUDA.
    Returns ``(distributed, rank, world, device)``; without the env variables
    ``(False, 0, 1, device)`` and nothing is initialized. Call
    ``torch.distributed.destroy_process_group()`` at the end when ``distributed``.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False, 0, 1, resolve_device(device_arg)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(device_arg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True, dist.get_rank(), dist.get_world_size(), device
