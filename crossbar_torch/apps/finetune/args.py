"""The run's hyper-parameters (:class:`FinetuneArgs`), its result, the learning-rate schedule,
and the resume check (a checkpoint this run cannot continue exactly is refused, naming why)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ...config import CrossbarConfig
from ...errors import UserInputError
from .data import ResumableSampler
from .losses import LOSSES


class ResumeError(UserInputError):
    """A checkpoint that this run cannot continue exactly. ``changes``: ``[(name, value in the
    checkpoint, value now)]`` for the arguments that differ."""

    def __init__(self, message: str, changes=()):
        super().__init__(message)
        self.changes = list(changes)


class TrainingDiverged(UserInputError):
    """The loss or a weight became NaN / Inf during training (names the step and the layers;
    a user error: the learning rate or the data, answered with one line by the scripts)."""


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
    # dropout off in training: distillation toward a teacher without dropout (sentence models,
    # whose transformers train with dropout 0.1, drifted from the deployed model with it on)
    freeze_dropout: bool = False
    amp: bool = False                # CUDA only (float16 autocast + GradScaler)
    seed: int = 0
    workers: int = 0
    save_every: int = 0              # checkpoint every N steps (0: only at the end)
    out_dir: Optional[str] = None
    progress: bool = True
    log_every: int = 10
    keep: int = 0                    # keep only the last N checkpoint-*.pt of out_dir (0: all)
    skip_bad: bool = False           # skip unreadable images (default: stop, naming the file)
    # train only the parameters off the crossbars (biases, norms, embeddings): the crossbar
    # weights, hence the cells and the writes, stay exactly as converted
    freeze_crossbar: bool = False
    # reprogram the crossbars every N optimizer steps (0: only after the last one). A rule-21
    # layer trains with the cells it holds (its feedback is a sequential solve, not simulated
    # per forward), so its cells follow the latent weight only when it is reprogrammed
    reprogram_every: int = 0

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise UserInputError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.batch_size < 1:
            raise UserInputError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.steps is not None and self.steps < 1:
            raise UserInputError(f"steps must be >= 1, got {self.steps}")
        if self.epochs < 1 and self.steps is None:
            raise UserInputError(f"epochs must be >= 1, got {self.epochs}")
        for name in ("workers", "save_every", "warmup_steps", "keep", "reprogram_every"):
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

