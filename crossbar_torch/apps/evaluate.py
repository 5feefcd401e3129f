"""ImageNet-style evaluation of several models on the same images in one pass over the data.

:func:`evaluate` runs every model of a ``{name: module}`` dict on each batch, so float and
crossbar models are scored on exactly the same images, and returns top-1 / top-5 correct counts
per model, the top-1 agreement of the first two models (float vs crossbar), the time spent in each
model's forward passes, and the unreadable images that were skipped.

Distributed evaluation (``torchrun``): give each rank a :class:`StridedSampler` (rank ``r`` gets
indices ``r, r + world, r + 2*world, ...``: no padding duplicates, unlike torch's
``DistributedSampler``, and nothing dropped). Ranks may then run different numbers of batches;
that is fine because only the totals are reduced, once, after the loop: counts with
``all_reduce(SUM)``, forward times with ``all_reduce(MAX)`` (ranks run in parallel, so the
throughput is all images over the slowest rank's time), bad-image lists with
``all_gather_object``. Percentages are computed after the reduction.

An unreadable image: the dataset should be built with ``skip_bad=True`` and the loader with
:func:`crossbar_torch.apps.data.collate_skip_bad`, so the bad file reaches the main process as a
record (path, reason) even with DataLoader workers. Then ``skip_bad=False`` (the default) raises
:class:`~crossbar_torch.apps.data.UnreadableImageError` naming the file, from the main process, and
``skip_bad=True`` counts and lists it. Under ``distributed`` a failure on one rank is shared with
all ranks before any other collective, so no rank hangs waiting for the failed one.
"""
from __future__ import annotations

import time
from typing import Dict, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Sampler

from .data import Batch, UnreadableImageError
from .distributed import dist_rank_world, init_distributed, rank_world, resolve_device

__all__ = ["StridedSampler", "dist_rank_world", "evaluate", "evaluate_model", "init_distributed",
           "rank_world", "resolve_device", "topk_correct"]


class StridedSampler(Sampler):
    """Rank ``rank`` of ``world`` gets indices ``rank, rank + world, ...`` of ``range(n)``.

    Every index goes to exactly one rank (no duplicates, no drops); ranks differ by at most one
    item. Deterministic, sequential order (evaluation needs no shuffling).
    """

    def __init__(self, dataset_or_len, rank: Optional[int] = None, world: Optional[int] = None):
        self.n = dataset_or_len if isinstance(dataset_or_len, int) else len(dataset_or_len)
        r, w = rank_world()
        self.rank = r if rank is None else int(rank)
        self.world = w if world is None else int(world)
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in range(world={self.world})")

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Bool ``(batch,)``: a label is among the top-``k`` predictions.

    ``labels`` is ``(batch,)`` (one class each) or ``(batch, m)`` label sets padded with -1 (any
    of the acceptable classes counts). ``k`` is capped at the number of classes.
    """
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices  # (B, k)
    ls = labels.to(top.device)
    if ls.dim() == 1:
        ls = ls[:, None]
    hit = (top[:, :, None] == ls[:, None, :]) & (ls[:, None, :] >= 0)
    return hit.flatten(1).any(dim=1)


def _unpack(batch):
    """(images, labels, indices, bad records) from a Batch or a default-collated tuple/list."""
    if isinstance(batch, Batch):
        return batch.images, batch.labels, batch.indices, list(batch.bad)
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1], batch[2] if len(batch) == 3 else None, []
    raise TypeError(f"cannot read a batch of type {type(batch).__name__}: expected Batch "
                    "(collate_skip_bad) or (images, labels[, indices])")


def _labelled(x, y, idx):
    """Drop the samples without a label (``-1``, e.g. distillation images; a label set without
    any class): they cannot be scored."""
    keep = (y >= 0) if y.dim() == 1 else (y >= 0).any(dim=1)
    if bool(keep.all()):
        return x, y, idx
    return x[keep], y[keep], (None if idx is None else torch.as_tensor(idx)[keep])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(models: Dict[str, nn.Module], loader, device, *, label_sets: bool = False,
             distributed: bool = False, skip_bad: bool = False, progress: bool = True,
             return_predictions: bool = False, agreement: Optional[tuple] = None,
             desc: str = "evaluate") -> dict:
    """Score every model on the same images, in one pass over ``loader``.

    Samples whose label is ``-1`` (unknown) are not scored nor counted.

    ``models``: ``{name: module}``, already on ``device`` and in eval mode (``eval()`` is called
    anyway). ``label_sets``: labels are ``(batch, m)`` sets of acceptable classes padded with -1
    (as :class:`~crossbar_torch.apps.data.BundledPhotos` yields) instead of one class per image.
    ``agreement``: the pair of model names whose top-1 predictions are compared; default
    ``("float", "crossbar")`` if both are present, else the first two models.

    Returns (identical on every rank when ``distributed``)::

        {"images": N, "world_size": W,
         "models": {name: {"top1_correct", "top5_correct", "top1", "top5" (percent),
                           "seconds", "img_per_s"}},
         "agreement": [a, b] or None, "agreement_top1_count", "agreement_top1" (percent),
         "bad_images": [{"index", "path", "reason"}, ...] (sorted by path),
         "predictions": {dataset index: {name: top-1 class}}  (only with return_predictions)}
    """
    device = torch.device(device)
    names = list(models)
    if not names:
        raise ValueError("evaluate: no models given")
    if agreement is None:
        agreement = ("float", "crossbar") if {"float", "crossbar"} <= set(names) else tuple(names[:2])
    agreement = tuple(agreement) if len(agreement) == 2 else None
    for m in models.values():
        m.eval()
    rank, world = rank_world() if distributed else (0, 1)

    n_models = len(names)
    top1 = [0] * n_models
    top5 = [0] * n_models
    seconds = [0.0] * n_models
    agree = 0
    images = 0
    bad: list = []
    preds: dict = {}
    error: Optional[BaseException] = None

    from tqdm.auto import tqdm
    try:
        total = len(loader)
    except TypeError:
        total = None
    bar = tqdm(total=total, desc=desc, unit="batch", disable=not progress or rank != 0,
               dynamic_ncols=True)
    try:
        for batch in loader:
            x, y, idx, bad_here = _unpack(batch)
            for b in bad_here:
                if not skip_bad:
                    raise UnreadableImageError(b.path, b.reason)
                bad.append({"index": int(b.index), "path": b.path, "reason": b.reason})
            if x is not None and x.shape[0]:
                x, y, idx = _labelled(x, torch.as_tensor(y), idx)
            if x is not None and x.shape[0]:
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                top1_pred = []
                for i, name in enumerate(names):
                    _sync(device)
                    t0 = time.perf_counter()
                    logits = models[name](x)
                    _sync(device)
                    seconds[i] += time.perf_counter() - t0
                    logits = logits.float()
                    top1[i] += int(topk_correct(logits, y, 1).sum())
                    top5[i] += int(topk_correct(logits, y, 5).sum())
                    top1_pred.append(logits.argmax(dim=-1))
                if agreement is not None:
                    a, b = names.index(agreement[0]), names.index(agreement[1])
                    agree += int((top1_pred[a] == top1_pred[b]).sum())
                if return_predictions:
                    ids = idx.tolist() if idx is not None else list(range(images, images + x.shape[0]))
                    for j, k in enumerate(ids):
                        preds[int(k)] = {name: int(top1_pred[i][j]) for i, name in enumerate(names)}
                images += x.shape[0]
            bar.update(1)
            if rank == 0 and progress:
                bar.set_postfix({f"{names[0]}@1": f"{100.0 * top1[0] / max(images, 1):.1f}"},
                                refresh=False)
    except BaseException as e:  # shared with the other ranks below, then re-raised
        error = e
    finally:
        bar.close()

    if distributed and world > 1:
        # First collective after the loop: did any rank fail? (Avoids a hang in the reductions.)
        flag = torch.tensor([1 if error is not None else 0], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.SUM)
        if int(flag.item()):
            msgs = [None] * world
            mine = None
            if isinstance(error, UnreadableImageError):
                mine = ("unreadable", error.path, error.reason)
            elif error is not None:
                mine = ("other", f"{type(error).__name__}: {error}", "")
            dist.all_gather_object(msgs, mine)
            if error is not None:
                raise error
            r, (kind, what, reason) = next((r, m) for r, m in enumerate(msgs) if m is not None)
            if kind == "unreadable":  # the same clear error on every rank, naming the file
                raise UnreadableImageError(what, reason)
            raise RuntimeError(f"evaluation failed on rank {r}: {what}")
    elif error is not None:
        raise error

    counts = torch.tensor([images, agree] + top1 + top5, dtype=torch.int64, device=device)
    secs = torch.tensor(seconds, dtype=torch.float64, device=device)
    if distributed and world > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        dist.all_reduce(secs, op=dist.ReduceOp.MAX)
        gathered = [None] * world
        dist.all_gather_object(gathered, bad)
        bad = [b for part in gathered for b in part]
        if return_predictions:
            gp = [None] * world
            dist.all_gather_object(gp, preds)
            preds = {k: v for part in gp for k, v in part.items()}
    counts = counts.cpu().tolist()
    secs = secs.cpu().tolist()
    images, agree = counts[0], counts[1]
    top1, top5 = counts[2:2 + n_models], counts[2 + n_models:]

    def pct(c):
        return 100.0 * c / images if images else float("nan")

    out = {
        "images": images,
        "world_size": world,
        "models": {
            name: {"top1_correct": top1[i], "top5_correct": top5[i], "top1": pct(top1[i]),
                   "top5": pct(top5[i]), "seconds": secs[i],
                   "img_per_s": images / secs[i] if secs[i] > 0 else None}
            for i, name in enumerate(names)
        },
        "agreement": list(agreement) if agreement else None,
        "agreement_top1_count": agree if agreement else None,
        "agreement_top1": pct(agree) if agreement else None,
        "bad_images": sorted(bad, key=lambda b: (b["path"], b["index"])),
    }
    if return_predictions:
        out["predictions"] = dict(sorted(preds.items()))
    return out


def evaluate_model(model: nn.Module, loader, device="cpu", *, progress: bool = False,
                   desc: str = "eval", skip_bad: bool = False) -> dict:
    """One model's top-1 / top-5 (percent) on ``loader``: :func:`evaluate` with one model,
    reduced over the ranks when a process group is initialized (each rank its own loader), the
    model's train / eval mode restored afterwards. Returns ``{"top1", "top5", "n",
    "bad_images"}`` (``n`` the scored samples, ``bad_images`` how many were skipped; 0.0 when
    nothing was scored)."""
    was_training = model.training
    try:
        ev = evaluate({"model": model}, loader, device, distributed=rank_world()[1] > 1,
                      skip_bad=skip_bad, progress=progress, desc=desc)
    finally:
        model.train(was_training)
    m, n = ev["models"]["model"], ev["images"]
    return {"top1": 100.0 * m["top1_correct"] / max(n, 1),
            "top5": 100.0 * m["top5_correct"] / max(n, 1), "n": n,
            "bad_images": len(ev["bad_images"])}
