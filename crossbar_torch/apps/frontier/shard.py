"""A frontier run under ``torchrun``: how a row's work is split across the ranks and how the
parts come back together.

The data is split by **batch**, not by item: rank ``r`` of ``W`` scores the batches ``r, r + W,
r + 2W, ...`` of the one-process batching (:class:`BatchShard`). Every image (sentence) is
scored exactly once, in exactly the batch it has in one process, so each model output is the
one a single process computes, bit for bit (a batch of other images could round differently),
and the CSV is the same whatever the number of ranks. A rank with no batch (a world larger than
the number of batches) contributes an empty part. The per-item results are gathered to every
rank (:func:`gather`) and put back in batch order; a failure on one rank is raised on all of
them, so no rank waits for a part that never comes. Without a process group (one process)
every helper is a no-op.
"""
from __future__ import annotations

from typing import Any, Callable, List

import torch.distributed as dist
from torch.utils.data import Sampler

from ..evaluate import StridedSampler, dist_rank_world

__all__ = ["BatchShard", "shard_loader", "rank_world", "gather", "broadcast", "on_rank0"]


def rank_world():
    """(rank, world size); (0, 1) without a process group."""
    return dist_rank_world()


class BatchShard(Sampler):
    """Batch sampler: the index lists of batches ``rank, rank + world, ...`` of ``range(n)`` cut
    into consecutive batches of ``batch_size`` (the last may be short). ``batch_numbers``: the
    global number of each batch this rank yields, in order."""

    def __init__(self, n: int, batch_size: int, rank: int = None, world: int = None):
        if batch_size < 1:
            raise ValueError(f"BatchShard: batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size = n, batch_size
        n_batches = (n + batch_size - 1) // batch_size
        self.batch_numbers = list(StridedSampler(n_batches, rank, world))

    def __iter__(self):
        for b in self.batch_numbers:
            yield list(range(b * self.batch_size, min((b + 1) * self.batch_size, self.n)))

    def __len__(self) -> int:
        return len(self.batch_numbers)


def shard_loader(dataset, batch_size: int, **kwargs):
    """A DataLoader over this rank's batches of ``dataset`` (:class:`BatchShard`); ``kwargs``
    go to the DataLoader (``num_workers``, ``collate_fn``)."""
    from torch.utils.data import DataLoader
    return DataLoader(dataset, batch_sampler=BatchShard(len(dataset), batch_size), **kwargs)


def _describe(e: BaseException):
    from ..data import UnreadableImageError
    if isinstance(e, UnreadableImageError):
        return ("unreadable", e.path, e.reason)
    from ...errors import UserInputError
    if isinstance(e, UserInputError):
        return ("user", type(e).__name__, str(e))
    return ("other", type(e).__name__, str(e))


def _raise_from(rank: int, what) -> None:
    kind, a, b = what
    if kind == "unreadable":  # the same clear error on every rank, naming the file
        from ..data import UnreadableImageError
        raise UnreadableImageError(a, b)
    if kind == "user":
        from .errors import FrontierError
        raise FrontierError(b)
    raise RuntimeError(f"frontier: rank {rank} failed: {a}: {b}")


def gather(part: Any, error: BaseException = None) -> List[Any]:
    """Every rank's ``part`` (rank order), on every rank. ``error``: this rank failed (its
    part is ignored); then every rank raises, this one its own error, the others the first
    failed rank's, as the same kind of error (an unreadable image, a user error, else a
    RuntimeError naming the rank)."""
    rank, world = rank_world()
    if world == 1:
        if error is not None:
            raise error
        return [part]
    parts = [None] * world
    dist.all_gather_object(parts, (None, part) if error is None else (_describe(error), None))
    if error is not None:
        raise error
    for r, (what, _) in enumerate(parts):
        if what is not None:
            _raise_from(r, what)
    return [p for _, p in parts]


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj``, on every rank."""
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(fn: Callable[[], Any]) -> Any:
    """``fn()`` computed on rank 0 alone and sent to every rank (what needs no split, such as
    the reprogram report: the other ranks wait instead of counting it again). An error on rank
    0 is raised on every rank."""
    rank, world = rank_world()
    if world == 1:
        return fn()
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as e:  # shared below, then re-raised
            error = e
    what, result = broadcast((None if error is None else _describe(error), result))
    if error is not None:
        raise error
    if what is not None:
        _raise_from(0, what)
    return result
