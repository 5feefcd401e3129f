"""The :class:`Trainer`: fine-tunes a converted model with its stuck cells in place.

In ``train()`` mode the crossbar layers compute with the weights the crossbars would hold if the
*current* latent weight were programmed now (fixed scales and sort index, stuck cells keeping
their levels: rules 4, 7 and 9); the gradient passes straight through to the latent weight.
:meth:`Trainer.fit` trains, checks that no stuck cell moved, and reprograms the crossbars.
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable, Optional

import torch
import torch.nn as nn

from ...config import CrossbarConfig, atomic_write_text
from ...errors import UserInputError
from ...nn.modules import crossbar_layers
from ..data import UnreadableImageError
from ..distributed import rank_world
from .args import (FinetuneArgs, FinetuneResult, ResumeError, TrainingDiverged, check_resume,
                   cosine_lambda, run_length)
from .checkpoint import (CHECKPOINT_FORMAT, atomic_torch_save, checkpoint_path,
                         check_stuck_cells, crossbar_fingerprint, derived_keys, load_checkpoint,
                         prune_checkpoints, resume_state_dict, stuck_snapshot)
from .data import ResumableSampler, SeededDataset, collate_train
from .losses import EMBEDDING_LOSSES, cross_entropy, distillation_loss, embedding_loss
from .seeding import rng_state, set_rng_state, set_seed


def _eval_modules(model: nn.Module, kind: type) -> int:
    """Put every submodule of type ``kind`` in eval mode. Returns how many there were."""
    found = [m.eval() for m in model.modules() if isinstance(m, kind)]
    return len(found)


def freeze_batchnorm(model: nn.Module) -> int:
    """Put every BatchNorm layer in eval mode (running statistics fixed; the affine parameters
    still train). Returns how many layers were frozen."""
    return _eval_modules(model, nn.modules.batchnorm._BatchNorm)


def freeze_dropout(model: nn.Module) -> int:
    """Put every dropout layer in eval mode (identity). Returns how many were frozen."""
    return _eval_modules(model, nn.modules.dropout._DropoutNd)


def to_device(x, device):
    """A tensor, or a dict / tuple / list of tensors (a batch of token ids), on ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x


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
        self.rank, self.world = rank_world()
        layers = crossbar_layers(model)
        if not layers:
            from ...nn.record import no_crossbar_layers
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
        if args.loss != "ce" and teacher is None:
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
        if args.freeze_crossbar:
            for _, layer in layers:
                layer.weight.requires_grad_(False)
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
        self._cells_before: dict = {}

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
            "rng": rng_state(),
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
            expected = set(derived_keys(self.student))
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
        set_rng_state(ck["rng"])
        draws = ck.get("read_noise_draws") or {}
        for n, l in crossbar_layers(self.student):
            if n in draws:
                l._forward_count = int(draws[n])

    def save_checkpoint(self, path=None) -> Optional[str]:
        if self.rank != 0 or (path is None and not self.args.out_dir):
            return None
        path = path or checkpoint_path(self.args.out_dir, self.step)
        atomic_torch_save(self.state_dict(), path)
        if self.args.out_dir:
            atomic_write_text(os.path.join(self.args.out_dir, "last_checkpoint.txt"),
                              os.path.basename(path) + "\n")
            prune_checkpoints(self.args.out_dir, self.args.keep, path)
        self.last_checkpoint = path
        return path

    # ---- one step ---------------------------------------------------------------------------
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
            out = self.module(x)
            if a.loss == "ce":
                return cross_entropy(out, y, a.label_smoothing)
            with torch.no_grad():
                t_out = self.teacher(x)
            if a.loss in EMBEDDING_LOSSES:  # sentence models: embeddings, not logits
                return embedding_loss(out, t_out, a.loss)
            return distillation_loss(out, t_out, a.temperature,
                                     a.alpha if a.loss == "kd+ce" else 1.0,
                                     y if a.loss == "kd+ce" else None)

    def train_mode(self) -> None:
        self.student.train()
        if self.args.freeze_bn:
            freeze_batchnorm(self.student)
        if self.args.freeze_dropout:
            freeze_dropout(self.student)

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

    def _train_step(self, x, y) -> float:
        """One optimizer step on ``(x, y)``; returns the loss (before the step)."""
        x, y = to_device(x, self.device), to_device(y, self.device)
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
        return lv

    # ---- the run ----------------------------------------------------------------------------
    def _start(self, resume, resume_path) -> None:
        """Restore ``resume`` (a checkpoint path or its loaded dict), else seed the run."""
        if resume is None:
            set_seed(self.args.seed)
            return
        if self.args.reprogram_every:
            raise ResumeError(
                f"resume: a run with {self._name('reprogram_every')} cannot be resumed (a "
                "checkpoint keeps the latent weights, not the cells of the last mid-run "
                "programming): start it again")
        if not isinstance(resume, dict):
            resume_path, resume = resume, load_checkpoint(resume)
        where = f"{os.fspath(resume_path)!r}" if resume_path is not None else "the checkpoint"
        self.load_state_dict(resume, where)
        self.resumed_from = {"checkpoint": None if resume_path is None
                             else os.fspath(resume_path), "step": self.step}
        self.log(f"resumed from step {self.step} of {self.total_steps} "
                 f"(epoch {self.epoch}, {where})")

    def _wrap_ddp(self) -> None:
        """Wrap the student in DistributedDataParallel when there is more than one process
        (done here, not in ``__init__``: its parameter broadcast would otherwise precede a
        caller's evaluation of the student)."""
        if self.world > 1 and self.module is self.student:
            self.module = nn.parallel.DistributedDataParallel(
                self.student,
                device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.epoch_step = 0

    def _run_epoch(self, limit: int, bar) -> Optional[int]:
        """Train on the rest of the current epoch, or until step ``limit``. Returns the step of
        the last periodic checkpoint written (None if none)."""
        self.sampler.set_epoch(self.epoch)
        self.sampler.set_position(self.epoch_step * self.args.batch_size)
        saved_at = None
        batches = 0
        for batch in self._loader():
            batches += 1
            xy = self._batch(batch)
            if xy is None:  # every image of the batch was unreadable: no step
                self.epoch_step += 1
                continue
            lv = self._train_step(*xy)
            bar.update(1)
            bar.set_postfix(loss=f"{lv:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            every = self.args.reprogram_every
            if every and self.step % every == 0 and self.step < self.total_steps:
                self._reprogram_mid_run()
            if self.step >= limit:
                if self.epoch_step >= self.steps_per_epoch:  # stopped on an epoch's last batch
                    self._next_epoch()
                return saved_at
            if self.args.save_every and self.step % self.args.save_every == 0:
                self.save_checkpoint()
                saved_at = self.step
        if batches == 0 and self.epoch_step == 0:
            raise UserInputError("the training data gives no batch (empty dataset?)")
        self._next_epoch()  # the epoch ran out
        return saved_at

    def _reprogram_mid_run(self) -> None:
        """``reprogram_every``: program the current latent weights (same sort index, scales
        and stuck cells); a rule-21 layer trains on with the cells this leaves."""
        from ...programming import reprogram
        with torch.no_grad():
            program = reprogram(self.student)
        self._cells_before = {n: l.cells.clone() for n, l in crossbar_layers(self.student)}
        self.log(f"step {self.step}: reprogrammed, {program.per_pass.writes:,} writes per pass")

    def _check_crossbars_kept(self, snapshot: dict) -> int:
        """Training never touches what the crossbars hold (train mode only simulates; only
        ``reprogram_every`` programs), and what it computes with keeps every stuck cell.
        Returns the stuck cells checked."""
        for n, l in crossbar_layers(self.student):
            if not torch.equal(l.cells, self._cells_before[n]):
                raise AssertionError(f"{n}: the programmed cells changed during training")
        return check_stuck_cells(self.student, snapshot, simulated=True)

    def fit(self, resume=None, *, stop_after: Optional[int] = None,
            resume_path=None) -> FinetuneResult:
        """Train to ``total_steps`` (or stop early after ``stop_after`` total steps, writing a
        checkpoint: for tests and time-limited jobs), then reprogram the crossbars.
        ``resume``: a checkpoint path, or its loaded dict (then ``resume_path`` names it in
        messages)."""
        from tqdm.auto import tqdm
        from ...programming import reprogram
        t0 = time.time()
        self._start(resume, resume_path)
        snapshot = stuck_snapshot(self.student)
        self._cells_before = {n: l.cells.clone() for n, l in crossbar_layers(self.student)}
        self.fingerprint()  # of the crossbars as converted, before the final reprogramming
        self._wrap_ddp()
        self.train_mode()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="finetune",
                   disable=not (self.args.progress and self.rank == 0), dynamic_ncols=True)
        limit = self.total_steps if stop_after is None else min(self.total_steps, stop_after)
        saved_at = None
        while self.step < limit:
            saved_at = self._run_epoch(limit, bar) or saved_at
        bar.close()
        checked = self._check_crossbars_kept(snapshot)
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
