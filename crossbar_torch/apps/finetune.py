"""Stuck-bit-aware fine-tuning (issue 6; DESIGN.md rules 4, 7 and 9).

In ``train()`` mode the crossbar layers compute with the weights the crossbars would hold if the
*current* latent weight were programmed now: quantized with the fixed scales, gathered through the
fixed sort index (rule 4: no re-sorting), encoded, stuck cells keeping their held level (rule 7),
decoded and un-sorted (rule 9). The gradient passes straight through to the latent float weight.
After training, :func:`crossbar_torch.reprogram` programs the fine-tuned latent weights (stuck cells
keep their levels) and gives the new write counts.

This module is the library part:

* losses: :func:`cross_entropy`, :func:`distillation_loss` (KL on temperature-softened logits,
  optionally mixed with cross-entropy);
* :class:`FinetuneArgs` (hyper-parameters) and :class:`Trainer` / :func:`finetune` (optimizer, cosine
  schedule with warmup, deterministic seeding, optional AMP on CUDA, DDP when
  ``torch.distributed`` is initialized, tqdm progress bars, atomic checkpoints, exact resume);
* :func:`evaluate` (top-1 / top-5), :func:`save_final` / :func:`load_finetuned` (the final
  checkpoint format ``{"model", "crossbar_config", "model_name"}``).

Training checkpoints (``checkpoint-<step>.pt``) hold only what a resume needs: the latent
weights and the other parameters / buffers of the model, the optimizer, scheduler and scaler
states, the RNG states, the step, the losses, the CrossbarConfig and the arguments. The
crossbar buffers that conversion derives from the *original* weights (``cells``, ``stuck``,
``sort_index``: about 10x the float weights) are left out: training never changes them, and a
resume rebuilds them by converting the same float model again (a fingerprint of them, stored
in the checkpoint, checks that the rebuilt ones are the same). ``keep`` keeps only the last N.

A resume refuses a checkpoint made with other arguments (naming each changed one), another
CrossbarConfig (naming the fields), another training set size or process count, or more steps
than the run asks for, and logs the step it resumed from.

Determinism and exact resume
----------------------------
* Sample order: :class:`ResumableSampler` (a ``DistributedSampler`` that can start mid-epoch);
  the order of epoch ``e`` is a pure function of ``(seed, e)``.
* Augmentation: :class:`SeededDataset` seeds ``random``, ``numpy`` and ``torch`` from
  ``(seed, epoch, sample position)`` around each sample's transform, so the augmentation of a
  sample does not depend on the number of DataLoader workers nor on where a run was resumed.
* Everything else random in a step (dropout) uses the global torch RNG of the training process;
  its state (and numpy's and python's) is saved in every checkpoint and restored on resume.
* Read noise (rule 19): each crossbar layer draws it from a counter of its forwards; the
  counters are saved in every checkpoint and restored on resume.
A run stopped after ``k`` steps and resumed from its step-``k`` checkpoint therefore ends with
weights bit-identical to an uninterrupted run (same seed, CPU; tested).
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import CrossbarConfig, atomic_write, atomic_write_text
from .data import BadImage, Batch, UnreadableImageError
from ..errors import UserInputError
from ..nn.modules import crossbar_layers

__all__ = [
    "cross_entropy", "distillation_loss", "FinetuneArgs", "FinetuneResult", "Trainer",
    "finetune", "evaluate", "set_seed", "freeze_batchnorm", "stuck_snapshot",
    "check_stuck_cells", "atomic_torch_save", "save_final", "load_finetuned",
    "load_checkpoint", "ResumableSampler", "SeededDataset", "cosine_lambda", "ResumeError",
    "TrainingDiverged", "crossbar_fingerprint", "resume_state_dict",
]

# crossbar buffers a training checkpoint leaves out (rebuilt on resume by converting the same
# float model; training never changes them)
DERIVED_BUFFERS = ("cells", "stuck", "sort_index")
CHECKPOINT_FORMAT = "crossbar_torch.finetune/2"


class ResumeError(UserInputError):
    """A checkpoint that this run cannot continue exactly. ``changes``: ``[(name, value in the
    checkpoint, value now)]`` for the arguments that differ."""

    def __init__(self, message: str, changes=()):
        super().__init__(message)
        self.changes = list(changes)


class TrainingDiverged(UserInputError):
    """The loss or a weight became NaN / Inf during training (names the step and the layers;
    a user error: the learning rate or the data, answered with one line by the scripts)."""


# ----------------------------------------------------------------------------------- losses

def cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                  label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy on labels (labels < 0, i.e. unknown, are ignored)."""
    return F.cross_entropy(logits.float(), labels, ignore_index=-1,
                           label_smoothing=label_smoothing)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      T: float = 1.0, alpha: float = 1.0,
                      labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Knowledge distillation (Hinton et al.): ``KL(softmax(t/T) || softmax(s/T)) * T**2``,
    averaged over the batch.

    With ``labels`` (and at least one known label, ``>= 0``) the result is
    ``alpha * KD + (1 - alpha) * CE(student, labels)``; without labels it is the KD term alone
    (``alpha`` is then ignored). The teacher is detached.
    """
    if T <= 0:
        raise UserInputError(f"temperature T must be > 0, got {T}")
    if not 0.0 <= alpha <= 1.0:
        raise UserInputError(f"alpha must be in [0, 1], got {alpha}")
    s = F.log_softmax(student_logits.float() / T, dim=-1)
    t = F.log_softmax(teacher_logits.detach().float() / T, dim=-1)
    kd = F.kl_div(s, t, reduction="batchmean", log_target=True) * (T * T)
    if labels is None or alpha >= 1.0 or not bool((labels >= 0).any()):
        return kd
    return alpha * kd + (1.0 - alpha) * cross_entropy(student_logits, labels)


LOSSES = ("ce", "kd", "kd+ce")


# ----------------------------------------------------------------------------------- helpers

def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def freeze_batchnorm(model: nn.Module) -> int:
    """Put every BatchNorm layer in eval mode (running statistics fixed; the affine parameters
    still train). Returns how many layers were frozen."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            n += 1
    return n


def _rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"torch": torch.get_rng_state(),
          "numpy": {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                    "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
          "python": _py_state_to_tensor(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _py_state_to_tensor(state):
    version, internal, gauss = state
    return {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss}


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    p = st["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def atomic_torch_save(obj: Any, path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then ``os.replace``."""
    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def load_checkpoint(path) -> dict:
    """Load a checkpoint written by :class:`Trainer` (tensors and plain containers only).
    A missing, unreadable or truncated file raises an error naming it."""
    from .checkpoint import WeightLoadError, read_checkpoint
    ck = read_checkpoint(path, "checkpoint")
    if not isinstance(ck, dict) or not {"model", "step", "optimizer"} <= set(ck):
        raise WeightLoadError(f"checkpoint {os.fspath(path)!r} is not a training checkpoint of "
                              "crossbar_torch.apps.finetune (expected the keys 'model', 'step', "
                              "'optimizer')")
    return ck


def _derived_keys(model: nn.Module) -> list:
    return [f"{name}.{leaf}" if name else leaf
            for name, _ in crossbar_layers(model) for leaf in DERIVED_BUFFERS]


def resume_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` without the derived crossbar buffers (:data:`DERIVED_BUFFERS`)."""
    drop = set(_derived_keys(model))
    return {k: v for k, v in model.state_dict().items() if k not in drop}


@torch.no_grad()
def crossbar_fingerprint(model: nn.Module) -> str:
    """SHA-256 of every crossbar layer's derived buffers (cells, stuck mask, sort index,
    scales): equal fingerprints mean the same programmed crossbars."""
    import hashlib
    h = hashlib.sha256()
    for name, layer in crossbar_layers(_unwrap(model)):
        h.update(name.encode() + b"\0")
        for leaf in DERIVED_BUFFERS + ("scale",):
            t = getattr(layer, leaf).detach().cpu().contiguous()
            if leaf == "sort_index":  # hashed as int64 whatever the stored width, so that
                t = t.long()          # fingerprints from before the narrow index still match
            h.update(f"{leaf}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _dist():
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


# ----------------------------------------------------------------------- stuck-cell checks

@torch.no_grad()
def stuck_snapshot(model: nn.Module) -> dict:
    """``{layer name: (stuck mask, levels the stuck cells hold)}`` of every crossbar layer."""
    snap = {}
    for name, layer in crossbar_layers(_unwrap(model)):
        if layer.stuck.numel():
            snap[name] = (layer.stuck.clone(), layer.cells[layer.stuck].clone())
    return snap


@torch.no_grad()
def check_stuck_cells(model: nn.Module, snapshot: dict, *, simulated: bool = False) -> int:
    """Check that every stuck cell of ``snapshot`` is still stuck and holds the same level.

    Checks the programmed ``cells`` buffers and, with ``simulated``, also what train mode
    computes with (the target cells of the current latent weight with the stuck cells kept).
    Returns the number of stuck cells checked; raises ``AssertionError`` on a mismatch.
    """
    n = 0
    layers = dict(crossbar_layers(_unwrap(model)))
    for name, (mask, levels) in snapshot.items():
        layer = layers[name]
        if not torch.equal(layer.stuck, mask):
            raise AssertionError(f"{name}: the stuck-cell mask changed")
        if not torch.equal(layer.cells[mask], levels):
            raise AssertionError(f"{name}: a stuck cell changed its level")
        if simulated:
            target = torch.where(layer.stuck, layer.cells, layer.target_cells())
            if not torch.equal(target[mask], levels):
                raise AssertionError(f"{name}: train mode changed a stuck cell's level")
        n += int(mask.sum())
    return n


# ------------------------------------------------------------------ data order / augmentation

class ResumableSampler(torch.utils.data.DistributedSampler):
    """``DistributedSampler`` (also for a single process) that yields ``(index, sample_seed)``
    pairs and can start mid-epoch (``set_position``). ``sample_seed`` is a pure function of
    ``(seed, epoch, position in the epoch's global order)``, used by :class:`SeededDataset`."""

    def __init__(self, dataset, *, num_replicas=1, rank=0, shuffle=True, seed=0,
                 drop_last=False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=drop_last)
        self.position = 0

    def set_position(self, position: int) -> None:
        """Skip the first ``position`` samples (of this rank) of the current epoch."""
        self.position = int(position)

    def __iter__(self):
        indices = list(super().__iter__())  # this rank's share: indices[rank::num_replicas]
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_003
        for i in range(self.position, len(indices)):
            global_pos = i * self.num_replicas + self.rank
            yield (indices[i], (base + global_pos) % (2 ** 63))

    def __len__(self):
        return max(0, self.num_samples - self.position)


def collate_train(items):
    """Training ``collate_fn``: ``(images, labels, bad)``; unreadable images
    (:class:`~crossbar_torch.apps.data.BadImage` records) are taken out of the batch and listed in
    ``bad``, so they reach the training process (even from DataLoader workers), which stops
    with an error naming the file or skips them (``skip_bad``). ``images`` is None when every
    item was bad."""
    from torch.utils.data import default_collate
    good = [it for it in items if not isinstance(it, BadImage)]
    bad = [it for it in items if isinstance(it, BadImage)]
    if not good:
        return None, None, bad
    x, y = default_collate(good)
    return x, y, bad


class SeededDataset(torch.utils.data.Dataset):
    """Wraps a dataset whose items are ``(image, label, ...)``; ``dataset[(index, seed)]`` runs
    the wrapped ``__getitem__`` (and so its random augmentation) with python, numpy and torch
    seeded from ``seed``, restoring the caller's RNG states afterwards. Returns
    ``(image, label)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            index, seed = key
        else:
            index, seed = key, None
        if seed is None:
            item = self.dataset[index]
        else:
            py, npst = random.getstate(), np.random.get_state()
            with torch.random.fork_rng(devices=[]):
                random.seed(seed)
                np.random.seed(seed % 2 ** 32)
                torch.manual_seed(seed)
                try:
                    item = self.dataset[index]
                finally:
                    random.setstate(py)
                    np.random.set_state(npst)
        if isinstance(item, BadImage):  # an unreadable image (skip_bad dataset): the
            return item                 # collate function reports or skips it
        if isinstance(item, (tuple, list)):
            image = item[0]
            label = item[1] if len(item) > 1 else -1
        else:
            image, label = item, -1
        return image, torch.as_tensor(label if label is not None else -1, dtype=torch.long)


def cosine_lambda(total_steps: int, warmup_steps: int = 0, min_factor: float = 0.0,
                  schedule: str = "cosine") -> Callable[[int], float]:
    """LR factor of optimizer step ``step`` (0-based): linear warmup from ``1/(warmup+1)`` then
    ``cosine`` decay to ``min_factor`` at ``total_steps`` (or ``constant`` / ``linear``)."""
    if schedule not in ("cosine", "constant", "linear"):
        raise UserInputError(f"schedule must be cosine, constant or linear, got {schedule!r}")

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        t = min(1.0, (step - warmup_steps) / span)
        if schedule == "linear":
            return min_factor + (1 - min_factor) * (1 - t)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t))
    return f


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: nn.Module, loader, device="cpu", *, progress: bool = False,
             desc: str = "eval", skip_bad: bool = False) -> dict:
    """Top-1 / top-5 accuracy (percent) of ``model`` in eval mode on ``loader``, whose batches
    are ``(images, labels, ...)``; samples with label < 0 are skipped. Under DDP the counts are
    summed over ranks (each rank evaluates its own loader). Batches of
    :func:`~crossbar_torch.apps.data.collate_skip_bad` may list unreadable images: an error naming
    the first one, or (``skip_bad``) counted in ``"bad_images"``."""
    from tqdm.auto import tqdm
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = bad = 0
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        if isinstance(batch, Batch) and batch.bad:
            if not skip_bad:
                raise UnreadableImageError(batch.bad[0].path, batch.bad[0].reason)
            bad += len(batch.bad)
        x, y = batch[0], batch[1]
        if x is None:
            continue
        x, y = x.to(device), torch.as_tensor(y).to(device)
        keep = y >= 0
        if not bool(keep.any()):
            continue
        logits = model(x)[keep]
        y = y[keep]
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y[:, None]).any(1).sum())
        total += int(y.numel())
    rank, world = _dist()
    if world > 1:
        t = torch.tensor([correct1, correct5, total], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        correct1, correct5, total = (int(v) for v in t.tolist())
    model.train(was_training)
    return {"top1": 100.0 * correct1 / max(total, 1), "top5": 100.0 * correct5 / max(total, 1),
            "n": total, "bad_images": bad}


# ---------------------------------------------------------------------------- the trainer

@dataclass
class FinetuneArgs:
    """Hyper-parameters of a fine-tuning run (all JSON-able; saved in checkpoints)."""

    loss: str = "ce"                 # ce | kd | kd+ce
    temperature: float = 4.0
    alpha: float = 0.9               # weight of KD when mixed with CE (kd+ce)
    epochs: int = 1
    steps: Optional[int] = None      # total optimizer steps; overrides epochs when set
    batch_size: int = 32
    lr: float = 1e-3
    opt: str = "adamw"               # any timm.optim.create_optimizer_v2 name (sgd, adamw, ...)
    momentum: float = 0.9
    weight_decay: float = 0.0
    sched: str = "cosine"            # cosine | constant | linear (per optimizer step)
    warmup_steps: int = 0
    min_lr_factor: float = 0.0
    grad_clip: Optional[float] = None
    label_smoothing: float = 0.0
    freeze_bn: bool = True           # BatchNorm running statistics fixed (tiny fine-tuning data)
    amp: bool = False                # CUDA only (float16 autocast + GradScaler)
    seed: int = 0
    workers: int = 0
    save_every: int = 0              # checkpoint every N steps (0: only at the end)
    out_dir: Optional[str] = None
    progress: bool = True
    log_every: int = 10
    keep: int = 0                    # keep only the last N checkpoint-*.pt of out_dir (0: all)
    skip_bad: bool = False           # skip unreadable images (default: stop, naming the file)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise UserInputError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.batch_size < 1:
            raise UserInputError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.steps is not None and self.steps < 1:
            raise UserInputError(f"steps must be >= 1, got {self.steps}")
        if self.epochs < 1 and self.steps is None:
            raise UserInputError(f"epochs must be >= 1, got {self.epochs}")
        for name in ("workers", "save_every", "warmup_steps", "keep"):
            if getattr(self, name) < 0:
                raise UserInputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise UserInputError(f"lr must be a finite number > 0, got {self.lr}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class FinetuneResult:
    steps: int
    epochs_started: int
    losses: list                      # (step, loss) pairs, one per optimizer step
    program: Any                      # ProgramResult of the reprogramming after training
    stuck_cells_checked: int
    seconds: float
    checkpoint: Optional[str] = None  # last checkpoint written (rank 0 with out_dir)
    resumed_from: Optional[dict] = None  # {"checkpoint", "step"} when resumed
    bad_images: list = dataclasses.field(default_factory=list)  # skipped (skip_bad)

    @property
    def writes_per_pass(self) -> int:
        return self.program.per_pass.writes if self.program is not None else None

    def summary(self) -> dict:
        p = self.program
        return {"steps": self.steps, "epochs_started": self.epochs_started,
                "first_loss": self.losses[0][1] if self.losses else None,
                "last_loss": self.losses[-1][1] if self.losses else None,
                "stuck_cells_checked": self.stuck_cells_checked, "seconds": self.seconds,
                "initial_writes": p.initial.writes if p else None,
                "writes_per_pass": p.per_pass.writes if p else None,
                "resumed_from": self.resumed_from,
                "bad_images": list(self.bad_images)}


# FinetuneArgs fields a resume may change: they do not change what is computed
RESUME_FREE = ("workers", "save_every", "out_dir", "progress", "log_every", "keep", "skip_bad")


def _fmt(v) -> str:
    return "none" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))


def run_length(args: FinetuneArgs, train_size: int, world: int = 1) -> tuple:
    """``(drop_last, steps_per_epoch, total_steps)`` of training ``train_size`` items with
    ``args`` on ``world`` processes (what :class:`Trainer` runs)."""
    drop_last = train_size >= args.batch_size * world
    num_samples = ResumableSampler(range(train_size), num_replicas=world, rank=0, shuffle=False,
                                   drop_last=drop_last).num_samples
    steps_per_epoch = max(1, math.ceil(num_samples / args.batch_size)
                          if not drop_last else num_samples // args.batch_size)
    total = args.steps if args.steps is not None else args.epochs * steps_per_epoch
    return drop_last, steps_per_epoch, total


def check_resume(ck: dict, where: str = "the checkpoint", *, args: FinetuneArgs,
                 config: CrossbarConfig, world: int, model_name: Optional[str],
                 run_info: Optional[dict], train_size: int, total_steps: Optional[int] = None,
                 arg_names: Optional[dict] = None) -> None:
    """Raise :class:`ResumeError` unless a run of ``args`` (with this config, process count,
    model, run facts and training set size) can continue checkpoint ``ck`` exactly. Needs no
    model: a script checks a resume before converting (:meth:`Trainer.check_resume` is this
    with the trainer's own facts)."""
    def name(field):
        return (arg_names or {}).get(field, field)
    if total_steps is None:
        total_steps = run_length(args, train_size, world)[2]
    step = int(ck.get("step", 0))
    if step > total_steps:
        what = (f"{name('steps')} {args.steps}" if args.steps is not None
                else f"{total_steps} steps ({name('epochs')} {args.epochs})")
        raise ResumeError(f"resume: {where} is at step {step}, past the end of this run "
                          f"({what}); ask for at least {step} steps")
    diff = [f"{k} {_fmt(theirs)} (checkpoint) vs {_fmt(now)} (now)" for k, (now, theirs)
            in config.diff(ck.get("crossbar_config") or {}).items()]
    if ck.get("crossbar_config") is not None and diff:
        raise ResumeError(f"resume: {where} was made with another CrossbarConfig: "
                          + "; ".join(diff))
    if ck.get("world_size", 1) != world:
        raise ResumeError(f"resume: {where} was made with {ck.get('world_size')} "
                          f"process(es), this run has {world}")
    if (ck.get("model_name") is not None and model_name is not None
            and ck["model_name"] != model_name):
        raise ResumeError(f"resume: {where} is of model {ck['model_name']!r}, this run "
                          f"trains {model_name!r}")
    changes = []
    saved_args = ck.get("finetune_args") or {}
    now = args.to_dict()
    for k, v in now.items():
        if k in RESUME_FREE or k not in saved_args:
            continue
        if k == "epochs" and saved_args.get("steps") is not None and now["steps"] is not None:
            continue  # --steps decides the length; --epochs is unused
        if saved_args[k] != v:
            changes.append((name(k), saved_args[k], v))
    saved_info = ck.get("run_info") or {}
    for k, v in (run_info or {}).items():
        if k in saved_info and saved_info[k] != v:
            changes.append((name(k), saved_info[k], v))
    if "train_size" in ck and ck["train_size"] != train_size:
        changes.append(("training images", ck["train_size"], train_size))
    if changes:
        raise ResumeError(
            f"resume: {where} was made with other arguments: "
            + "; ".join(f"{n} {_fmt(a)} (checkpoint) vs {_fmt(b)} (now)"
                        for n, a, b in changes)
            + ". Resume with the checkpoint's values, or start a new run", changes)


class Trainer:
    """Fine-tunes a converted model (the *student*) with its stuck cells in place.

    ``model``: a model converted by :func:`crossbar_torch.convert` (programmed, so the stuck
    cells hold their levels). ``dataset``: items ``(image, label, ...)`` (label ``-1`` when
    unknown), or :class:`~crossbar_torch.apps.data.BadImage` records for unreadable images (a
    ``skip_bad=True`` dataset): the run stops with an error naming the file, or skips it with
    ``args.skip_bad``. ``teacher``: the float model, needed for ``loss='kd'`` / ``'kd+ce'``;
    kept in eval mode without gradients. ``config``: the CrossbarConfig (taken from the layers
    when omitted), saved in checkpoints.

    Resume (``fit(resume=path)``): ``model`` must be converted from the same float weights
    with the same config (the derived crossbar buffers are rebuilt that way, and checked), and
    the arguments must be the checkpoint's: a change raises :class:`ResumeError` naming each
    changed argument (``arg_names`` maps field names to the caller's flags for the message).
    ``run_info``: more JSON-able facts of the run (e.g. augmentation flags) that a resume must
    not change. ``log``: where progress messages go (default: stderr on rank 0).
    """

    def __init__(self, model: nn.Module, dataset, args: FinetuneArgs, *,
                 teacher: Optional[nn.Module] = None, config: Optional[CrossbarConfig] = None,
                 model_name: Optional[str] = None, device="cpu", collate_fn=None,
                 log: Optional[Callable[[str], None]] = None,
                 arg_names: Optional[dict] = None, run_info: Optional[dict] = None):
        self.args = args
        self.device = torch.device(device)
        self.rank, self.world = _dist()
        layers = crossbar_layers(model)
        if not layers:
            from ..nn.record import no_crossbar_layers
            raise no_crossbar_layers(model, "Trainer")
        self.config = config or layers[0][1].config
        self.model_name = model_name
        self.arg_names = dict(arg_names or {})
        self.run_info = dict(run_info or {})
        if log is None:
            import sys

            def log(msg):
                print(msg, file=sys.stderr, flush=True)
        self.log = log if self.rank == 0 else (lambda msg: None)
        if args.loss in ("kd", "kd+ce") and teacher is None:
            raise UserInputError(f"loss={args.loss!r} needs a teacher (the float model)")
        self.student = model.to(self.device)
        self.teacher = teacher.to(self.device).eval() if teacher is not None else None
        if self.teacher is not None:
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.dataset = SeededDataset(dataset)
        self.train_size = n = len(dataset)
        if n == 0:
            raise UserInputError("the training data holds no items")
        drop_last, self.steps_per_epoch, self.total_steps = run_length(args, n, self.world)
        self.sampler = ResumableSampler(self.dataset, num_replicas=self.world, rank=self.rank,
                                        shuffle=True, seed=args.seed, drop_last=drop_last)
        self.collate_fn = collate_fn
        self.amp = bool(args.amp and self.device.type == "cuda")
        self.module = self.student  # wrapped in DistributedDataParallel by fit() (its
        # parameter broadcast would otherwise precede a caller's evaluation of the student)
        from timm.optim import create_optimizer_v2
        kw = {"momentum": args.momentum} if args.opt.lower() in ("sgd", "momentum", "nesterov") else {}
        self.optimizer = create_optimizer_v2(self.student, opt=args.opt, lr=args.lr,
                                             weight_decay=args.weight_decay, **kw)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_lambda(self.total_steps, args.warmup_steps,
                                          args.min_lr_factor, args.sched))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.step = 0
        self.epoch = 0
        self.epoch_step = 0   # batches consumed in the current epoch (one optimizer step each)
        self.losses: list = []
        self.bad_images: list = []
        self.last_checkpoint = None
        self.resumed_from = None
        self._fingerprint = None

    def _name(self, field: str) -> str:
        return self.arg_names.get(field, field)

    # ---- checkpoints ----------------------------------------------------------------------
    def fingerprint(self) -> str:
        """:func:`crossbar_fingerprint` of the student as converted (computed once: training
        never changes the derived buffers; the final reprogramming comes after the last use)."""
        if self._fingerprint is None:
            self._fingerprint = crossbar_fingerprint(self.student)
        return self._fingerprint

    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": resume_state_dict(self.student),
            "crossbar_fingerprint": self.fingerprint(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step, "epoch": self.epoch, "epoch_step": self.epoch_step,
            "total_steps": self.total_steps, "train_size": self.train_size,
            "sampler": {"epoch": self.epoch, "position": self.epoch_step * self.args.batch_size,
                        "seed": self.args.seed},
            "rng": _rng_state(),
            # rule 19: each layer draws its read noise from a counter of its forwards
            "read_noise_draws": {n: int(l._forward_count)
                                 for n, l in crossbar_layers(self.student)},
            "losses": [[int(s), float(l)] for s, l in self.losses],
            # the device's values, not its name or path: the checkpoint loads anywhere
            "crossbar_config": self.config.with_device_values().to_dict(),
            "model_name": self.model_name,
            "finetune_args": self.args.to_dict(),
            "run_info": self.run_info,
            "world_size": self.world,
        }

    def check_resume(self, ck: dict, where: str = "the checkpoint") -> None:
        """Raise :class:`ResumeError` unless this run can continue ``ck`` exactly."""
        check_resume(ck, where, args=self.args, config=self.config, world=self.world,
                     model_name=self.model_name, run_info=self.run_info,
                     train_size=self.train_size, total_steps=self.total_steps,
                     arg_names=self.arg_names)

    def load_state_dict(self, ck: dict, where: str = "the checkpoint") -> None:
        self.check_resume(ck, where)
        sd = ck["model"]
        if "crossbar_fingerprint" in ck:  # a resume state: the derived buffers are rebuilt
            if ck["crossbar_fingerprint"] != self.fingerprint():
                raise ResumeError(
                    f"resume: the crossbars of this run's converted model differ from those "
                    f"{where} was trained with (cells, stuck cells, sort index or scales): "
                    "convert the same float weights (same --model, weights and --seed) with the "
                    "same configuration")
            missing, unexpected = self.student.load_state_dict(sd, strict=False)
            expected = set(_derived_keys(self.student))
            bad = sorted(set(missing) - expected)
            if bad or unexpected:
                raise ResumeError(f"resume: {where} does not fit the model: "
                                  f"missing {bad[:5]}, unexpected {sorted(unexpected)[:5]}")
        else:  # an older, full checkpoint
            self.student.load_state_dict(sd)
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        self.step, self.epoch, self.epoch_step = ck["step"], ck["epoch"], ck["epoch_step"]
        self.losses = [(int(s), float(l)) for s, l in ck.get("losses", [])]
        _set_rng_state(ck["rng"])
        draws = ck.get("read_noise_draws") or {}
        for n, l in crossbar_layers(self.student):
            if n in draws:
                l._forward_count = int(draws[n])

    def save_checkpoint(self, path=None) -> Optional[str]:
        if self.rank != 0 or (path is None and not self.args.out_dir):
            return None
        path = path or os.path.join(self.args.out_dir, f"checkpoint-{self.step:07d}.pt")
        atomic_torch_save(self.state_dict(), path)
        if self.args.out_dir:
            atomic_write_text(os.path.join(self.args.out_dir, "last_checkpoint.txt"),
                              os.path.basename(path) + "\n")
            self._prune_checkpoints(path)
        self.last_checkpoint = path
        return path

    def _prune_checkpoints(self, newest) -> None:
        """Keep the last ``args.keep`` ``checkpoint-<step>.pt`` of out_dir (0: keep all)."""
        import re
        if not self.args.keep:
            return
        found = []
        for f in os.listdir(self.args.out_dir):
            m = re.fullmatch(r"checkpoint-(\d+)\.pt", f)
            if m:
                found.append((int(m.group(1)), f))
        found.sort()
        for _, f in found[:-self.args.keep]:
            p = os.path.join(self.args.out_dir, f)
            if os.path.abspath(p) != os.path.abspath(newest):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass

    # ---- training ---------------------------------------------------------------------------
    def _loader(self):
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=self.args.batch_size, sampler=self.sampler,
            num_workers=self.args.workers, collate_fn=self.collate_fn or collate_train,
            drop_last=self.sampler.drop_last,
            generator=torch.Generator().manual_seed(self.args.seed),
            persistent_workers=False, pin_memory=self.device.type == "cuda")

    def _loss(self, x, y):
        a = self.args
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            logits = self.module(x)
            if a.loss == "ce":
                return cross_entropy(logits, y, a.label_smoothing)
            with torch.no_grad():
                t_logits = self.teacher(x)
            return distillation_loss(logits, t_logits, a.temperature,
                                     a.alpha if a.loss == "kd+ce" else 1.0,
                                     y if a.loss == "kd+ce" else None)

    def train_mode(self) -> None:
        self.student.train()
        if self.args.freeze_bn:
            freeze_batchnorm(self.student)

    def _batch(self, batch):
        """(x, y) of a loader batch, or None when every image of it was unreadable (skipped)."""
        if self.collate_fn is not None:
            return batch[0], batch[1]
        x, y, bad = batch
        for b in bad:
            if not self.args.skip_bad:
                raise UnreadableImageError(b.path, b.reason)
            if all(r["path"] != b.path for r in self.bad_images):  # listed once, not per epoch
                self.bad_images.append({"path": b.path, "reason": b.reason})
                self.log(f"skipped unreadable image {b.path}: {b.reason}")
        return None if x is None else (x, y)

    def _diverged_hint(self) -> str:
        return (f"training diverged: lower {self._name('lr')} (now {self.args.lr:g})"
                + ("" if self.args.grad_clip else f" or set {self._name('grad_clip')}"))

    def _check_weights_finite(self) -> None:
        """After an optimizer step: every parameter finite, else name the layers."""
        bad = [n for n, p in self.student.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise TrainingDiverged(
                f"step {self.step}: NaN / Inf in {', '.join(bad[:5])}"
                + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
                + f" ({self._diverged_hint()})")

    def fit(self, resume=None, *, stop_after: Optional[int] = None,
            resume_path=None) -> FinetuneResult:
        """Train to ``total_steps`` (or stop early after ``stop_after`` total steps, writing a
        checkpoint: for tests and time-limited jobs), then reprogram the crossbars.
        ``resume``: a checkpoint path, or its loaded dict (then ``resume_path`` names it in
        messages)."""
        from tqdm.auto import tqdm
        from ..programming import reprogram
        t0 = time.time()
        if resume is not None:
            if not isinstance(resume, dict):
                resume_path, resume = resume, load_checkpoint(resume)
            where = f"{os.fspath(resume_path)!r}" if resume_path is not None else "the checkpoint"
            self.load_state_dict(resume, where)
            self.resumed_from = {"checkpoint": None if resume_path is None
                                 else os.fspath(resume_path), "step": self.step}
            self.log(f"resumed from step {self.step} of {self.total_steps} "
                     f"(epoch {self.epoch}, {where})")
        else:
            set_seed(self.args.seed)
        snapshot = stuck_snapshot(self.student)
        cells_before = {n: l.cells.clone() for n, l in crossbar_layers(self.student)}
        self.fingerprint()  # of the crossbars as converted, before the final reprogramming
        if self.world > 1 and self.module is self.student:
            self.module = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.train_mode()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="finetune",
                   disable=not (self.args.progress and self.rank == 0), dynamic_ncols=True)
        limit = self.total_steps if stop_after is None else min(self.total_steps, stop_after)
        saved_at = None
        while self.step < limit:
            self.sampler.set_epoch(self.epoch)
            self.sampler.set_position(self.epoch_step * self.args.batch_size)
            batches = 0
            for batch in self._loader():
                batches += 1
                xy = self._batch(batch)
                if xy is None:  # every image of the batch was unreadable: no step
                    self.epoch_step += 1
                    continue
                x, y = xy[0].to(self.device), xy[1].to(self.device)
                self.optimizer.zero_grad(set_to_none=True)
                loss = self._loss(x, y)
                lv = float(loss.detach())
                if not math.isfinite(lv) and not self.amp:  # (AMP skips such steps itself)
                    raise TrainingDiverged(f"step {self.step + 1}: the loss is {lv} "
                                           f"({self._diverged_hint()})")
                self.scaler.scale(loss).backward()
                if self.args.grad_clip:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.student.parameters(), self.args.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                self.step += 1
                self.epoch_step += 1
                self._check_weights_finite()
                self.losses.append((self.step, lv))
                bar.update(1)
                bar.set_postfix(loss=f"{lv:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                if self.step >= limit:
                    break
                if self.args.save_every and self.step % self.args.save_every == 0:
                    self.save_checkpoint()
                    saved_at = self.step
            else:  # the epoch ran out
                if batches == 0 and self.epoch_step == 0:
                    raise UserInputError("the training data gives no batch (empty dataset?)")
                self.epoch += 1
                self.epoch_step = 0
                continue
            if self.epoch_step >= self.steps_per_epoch:  # stopped on an epoch's last batch
                self.epoch += 1
                self.epoch_step = 0
        bar.close()
        # Training never touches what the crossbars hold (train mode only simulates).
        for n, l in crossbar_layers(self.student):
            if not torch.equal(l.cells, cells_before[n]):
                raise AssertionError(f"{n}: the programmed cells changed during training")
        checked = check_stuck_cells(self.student, snapshot, simulated=True)
        program = None
        if self.step >= self.total_steps:
            program = reprogram(self.student)
            checked = check_stuck_cells(self.student, snapshot)
        if self.args.out_dir and saved_at != self.step:
            self.save_checkpoint()  # the final one (its latent weights are the final ones)
        self.student.eval()
        return FinetuneResult(self.step, self.epoch, list(self.losses), program, checked,
                              time.time() - t0, self.last_checkpoint, self.resumed_from,
                              list(self.bad_images))


def finetune(model: nn.Module, dataset, *, teacher: Optional[nn.Module] = None,
             resume=None, device="cpu", model_name=None, config=None, collate_fn=None,
             stop_after: Optional[int] = None, **kwargs) -> FinetuneResult:
    """Fine-tune ``model`` (converted, stuck cells in place) on ``dataset``, then reprogram it.

    ``kwargs`` are :class:`FinetuneArgs` fields. Returns a :class:`FinetuneResult` whose
    ``program`` holds the new reprogram counts; the model is left in eval mode, programmed
    with its fine-tuned weights.
    """
    args = FinetuneArgs(**kwargs)
    tr = Trainer(model, dataset, args, teacher=teacher, config=config, model_name=model_name,
                 device=device, collate_fn=collate_fn)
    return tr.fit(resume, stop_after=stop_after)


# ------------------------------------------------------------------- final checkpoint format

def save_final(model: nn.Module, path, *, config: Optional[CrossbarConfig] = None,
               model_name: Optional[str] = None, extra: Optional[dict] = None) -> None:
    """Write ``{"model": state_dict, "crossbar_config": cfg.to_dict(), "model_name": name}``
    atomically (``extra`` entries are added; they must be plain data)."""
    model = _unwrap(model)
    if config is None:
        config = crossbar_layers(model)[0][1].config
    obj = {"model": model.state_dict(),
           "crossbar_config": config.with_device_values().to_dict(),  # values, not a path
           "model_name": model_name}
    if extra:
        obj.update(extra)
    atomic_torch_save(obj, path)


def load_finetuned(path, model_builder: Callable[..., nn.Module], *, map_location="cpu"):
    """Load a fine-tuned checkpoint: ``model_builder()`` (or ``model_builder(model_name)`` if
    it takes an argument) builds the float model, which is converted with the saved config
    (without programming: the saved buffers hold what the crossbars hold) and given the saved
    state dict. Returns the converted model in eval mode.

    Also accepts training checkpoints (``checkpoint-<step>.pt``), which leave out the derived
    crossbar buffers: then ``model_builder`` must give the *original* float weights (the ones
    the run converted); they are converted and programmed, checked against the checkpoint's
    fingerprint, given the checkpoint's latent weights and reprogrammed (stuck cells keep
    their levels), i.e. the model as it would be deployed had training stopped at that step."""
    import inspect
    from ..nn.conversion import convert
    from ..programming import reprogram
    from .checkpoint import read_checkpoint
    ck = read_checkpoint(path, "checkpoint")
    if not isinstance(ck, dict) or "model" not in ck or "crossbar_config" not in ck:
        raise UserInputError(f"{os.fspath(path)!r}: not a fine-tuned crossbar checkpoint (expected "
                             "keys 'model' and 'crossbar_config')")
    cfg = CrossbarConfig.from_dict(ck["crossbar_config"])
    try:
        takes_arg = len(inspect.signature(model_builder).parameters) > 0
    except (TypeError, ValueError):
        takes_arg = False
    base = model_builder(ck.get("model_name")) if takes_arg else model_builder()
    if "crossbar_fingerprint" in ck:  # a training checkpoint: rebuild the derived buffers
        xmodel = convert(base, cfg)
        if crossbar_fingerprint(xmodel) != ck["crossbar_fingerprint"]:
            raise UserInputError(f"{os.fspath(path)!r} is a training checkpoint whose crossbars "
                                 "cannot be rebuilt from these weights: the builder must give the "
                                 "float weights the run converted (or load the run's final.pt)")
        missing, unexpected = xmodel.load_state_dict(ck["model"], strict=False)
        bad = sorted(set(missing) - set(_derived_keys(xmodel)))
        if bad or unexpected:
            raise UserInputError(f"{os.fspath(path)!r} does not fit the model: missing {bad[:5]}, "
                                 f"unexpected {sorted(unexpected)[:5]}")
        reprogram(xmodel)
    else:
        xmodel = convert(base, cfg, program=False)
        xmodel.load_state_dict(ck["model"])
    return xmodel.to(map_location).eval()
