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

Determinism and exact resume
----------------------------
* Sample order: :class:`ResumableSampler` (a ``DistributedSampler`` that can start mid-epoch);
  the order of epoch ``e`` is a pure function of ``(seed, e)``.
* Augmentation: :class:`SeededDataset` seeds ``random``, ``numpy`` and ``torch`` from
  ``(seed, epoch, sample position)`` around each sample's transform, so the augmentation of a
  sample does not depend on the number of DataLoader workers nor on where a run was resumed.
* Everything else random in a step (dropout) uses the global torch RNG of the training process;
  its state (and numpy's and python's) is saved in every checkpoint and restored on resume.
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

from .config import CrossbarConfig, atomic_write, atomic_write_text
from .modules import crossbar_layers

__all__ = [
    "cross_entropy", "distillation_loss", "FinetuneArgs", "FinetuneResult", "Trainer",
    "finetune", "evaluate", "set_seed", "freeze_batchnorm", "stuck_snapshot",
    "check_stuck_cells", "atomic_torch_save", "save_final", "load_finetuned",
    "load_checkpoint", "ResumableSampler", "SeededDataset", "cosine_lambda",
]


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
        raise ValueError(f"temperature T must be > 0, got {T}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
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
    """Load a checkpoint written by :class:`Trainer` (tensors and plain containers only)."""
    return torch.load(os.fspath(path), map_location="cpu", weights_only=True)


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
        raise ValueError(f"schedule must be cosine, constant or linear, got {schedule!r}")

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
             desc: str = "eval") -> dict:
    """Top-1 / top-5 accuracy (percent) of ``model`` in eval mode on ``loader``, whose batches
    are ``(images, labels, ...)``; samples with label < 0 are skipped. Under DDP the counts are
    summed over ranks (each rank evaluates its own loader)."""
    from tqdm.auto import tqdm
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
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
            "n": total}


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

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.steps is not None and self.steps < 0:
            raise ValueError("steps must be >= 0")

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
                "writes_per_pass": p.per_pass.writes if p else None}


class Trainer:
    """Fine-tunes a converted model (the *student*) with its stuck cells in place.

    ``model``: a model converted by :func:`crossbar_torch.convert` (programmed, so the stuck
    cells hold their levels). ``dataset``: items ``(image, label, ...)`` (label ``-1`` when
    unknown). ``teacher``: the float model, needed for ``loss='kd'`` / ``'kd+ce'``; kept in eval
    mode without gradients. ``config``: the CrossbarConfig (taken from the layers when omitted),
    saved in checkpoints. ``resume``: a checkpoint path written by a previous run with the same
    arguments; training continues exactly where it stopped.
    """

    def __init__(self, model: nn.Module, dataset, args: FinetuneArgs, *,
                 teacher: Optional[nn.Module] = None, config: Optional[CrossbarConfig] = None,
                 model_name: Optional[str] = None, device="cpu", collate_fn=None):
        self.args = args
        self.device = torch.device(device)
        self.rank, self.world = _dist()
        layers = crossbar_layers(model)
        if not layers:
            raise ValueError("the model has no crossbar layers: convert it first")
        self.config = config or layers[0][1].config
        self.model_name = model_name
        if args.loss in ("kd", "kd+ce") and teacher is None:
            raise ValueError(f"loss={args.loss!r} needs a teacher (the float model)")
        self.student = model.to(self.device)
        self.teacher = teacher.to(self.device).eval() if teacher is not None else None
        if self.teacher is not None:
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.dataset = SeededDataset(dataset)
        n = len(dataset)
        drop_last = n >= args.batch_size * self.world
        self.sampler = ResumableSampler(self.dataset, num_replicas=self.world, rank=self.rank,
                                        shuffle=True, seed=args.seed, drop_last=drop_last)
        self.collate_fn = collate_fn
        self.steps_per_epoch = max(1, math.ceil(self.sampler.num_samples / args.batch_size)
                                   if not drop_last else self.sampler.num_samples // args.batch_size)
        self.total_steps = (args.steps if args.steps is not None
                            else args.epochs * self.steps_per_epoch)
        self.amp = bool(args.amp and self.device.type == "cuda")
        self.module = self.student
        if self.world > 1:
            self.module = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None)
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
        self.epoch_step = 0   # optimizer steps done in the current epoch
        self.losses: list = []
        self.last_checkpoint = None

    # ---- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "model": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step, "epoch": self.epoch, "epoch_step": self.epoch_step,
            "sampler": {"epoch": self.epoch, "position": self.epoch_step * self.args.batch_size,
                        "seed": self.args.seed},
            "rng": _rng_state(),
            "losses": [[int(s), float(l)] for s, l in self.losses],
            "crossbar_config": self.config.to_dict(),
            "model_name": self.model_name,
            "finetune_args": self.args.to_dict(),
            "world_size": self.world,
        }

    def load_state_dict(self, ck: dict) -> None:
        saved = ck.get("crossbar_config")
        if saved is not None and saved != self.config.to_dict():
            raise ValueError("resume: the checkpoint was made with a different CrossbarConfig")
        if ck.get("world_size", 1) != self.world:
            raise ValueError(f"resume: the checkpoint was made with {ck.get('world_size')} "
                             f"process(es), this run has {self.world}")
        self.student.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        self.step, self.epoch, self.epoch_step = ck["step"], ck["epoch"], ck["epoch_step"]
        self.losses = [(int(s), float(l)) for s, l in ck.get("losses", [])]
        _set_rng_state(ck["rng"])

    def save_checkpoint(self, path=None) -> Optional[str]:
        if self.rank != 0 or (path is None and not self.args.out_dir):
            return None
        path = path or os.path.join(self.args.out_dir, f"checkpoint-{self.step:07d}.pt")
        atomic_torch_save(self.state_dict(), path)
        if self.args.out_dir:
            atomic_write_text(os.path.join(self.args.out_dir, "last_checkpoint.txt"),
                              os.path.basename(path) + "\n")
        self.last_checkpoint = path
        return path

    # ---- training ---------------------------------------------------------------------------
    def _loader(self):
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=self.args.batch_size, sampler=self.sampler,
            num_workers=self.args.workers, collate_fn=self.collate_fn,
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

    def fit(self, resume=None, *, stop_after: Optional[int] = None) -> FinetuneResult:
        """Train to ``total_steps`` (or stop early after ``stop_after`` total steps, writing a
        checkpoint: for tests and time-limited jobs), then reprogram the crossbars."""
        from tqdm.auto import tqdm
        from .programming import reprogram
        t0 = time.time()
        if resume is not None:
            self.load_state_dict(load_checkpoint(resume) if not isinstance(resume, dict)
                                 else resume)
        else:
            set_seed(self.args.seed)
        snapshot = stuck_snapshot(self.student)
        cells_before = {n: l.cells.clone() for n, l in crossbar_layers(self.student)}
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
                x, y = batch[0].to(self.device), batch[1].to(self.device)
                self.optimizer.zero_grad(set_to_none=True)
                loss = self._loss(x, y)
                self.scaler.scale(loss).backward()
                if self.args.grad_clip:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.student.parameters(), self.args.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                self.step += 1
                self.epoch_step += 1
                lv = float(loss.detach())
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
                    raise ValueError("the training data gives no batch (empty dataset?)")
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
            self.save_checkpoint()  # the final one holds the reprogrammed cells
        self.student.eval()
        return FinetuneResult(self.step, self.epoch, list(self.losses), program, checked,
                              time.time() - t0, self.last_checkpoint)


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
    obj = {"model": model.state_dict(), "crossbar_config": config.to_dict(),
           "model_name": model_name}
    if extra:
        obj.update(extra)
    atomic_torch_save(obj, path)


def load_finetuned(path, model_builder: Callable[..., nn.Module], *, map_location="cpu"):
    """Load a fine-tuned checkpoint: ``model_builder()`` (or ``model_builder(model_name)`` if
    it takes an argument) builds the float model, which is converted with the saved config
    (without programming: the saved buffers hold what the crossbars hold) and given the saved
    state dict. Returns the converted model in eval mode. Also accepts training checkpoints
    (they have the same ``model`` / ``crossbar_config`` keys)."""
    import inspect
    from .convert import convert
    ck = torch.load(os.fspath(path), map_location=map_location, weights_only=True)
    if not isinstance(ck, dict) or "model" not in ck or "crossbar_config" not in ck:
        raise ValueError(f"{path}: not a fine-tuned crossbar checkpoint (expected keys 'model' "
                         "and 'crossbar_config')")
    cfg = CrossbarConfig.from_dict(ck["crossbar_config"])
    try:
        takes_arg = len(inspect.signature(model_builder).parameters) > 0
    except (TypeError, ValueError):
        takes_arg = False
    base = model_builder(ck.get("model_name")) if takes_arg else model_builder()
    xmodel = convert(base, cfg, program=False)
    xmodel.load_state_dict(ck["model"])
    return xmodel.eval()
