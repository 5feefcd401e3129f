#!/usr/bin/env python
"""Worked example 1: stuck-bit-aware fine-tuning of a compact CNN on scikit-learn's digits.

1. Train a small CNN (float) on the bundled 8x8 digits (1797 images; fixed stratified split,
   1347 train / 450 test, fixed seed).
2. Convert it with an aggressive bit-stucking configuration (small 32x32 crossbars, 8-bit
   differential weights, the 4 low slices stuck at reprogram_fraction 0.25, pool 1): stucking
   clearly costs accuracy.
3. Fine-tune with labels (cross-entropy) with the stuck cells in place, reprogram, evaluate again.
4. Print a table (accuracy, writes per pass, reduction before / after) and optionally ``--json``.

    .venv/bin/python scripts/example_digits.py [--seed 0] [--epochs 8] [--json out.json]

Runs in a few seconds on a CPU.
"""
from __future__ import annotations

import json
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import crossbar_torch as xb
from crossbar_torch.config import atomic_write_text
from crossbar_torch.apps.finetune import evaluate, finetune, set_seed

DIGITS_CONFIG = dict(rows=32, cols=32, weight_bits=8, sort="magnitude", stuck_slices=5,
                     reprogram_fraction=0.25, pool=1, seed=0)


class DigitsCNN(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4 * w, 10)

    def forward(self, x):
        return self.fc(self.features(x))


def digits_split(seed: int = 0):
    """(x_train, y_train, x_test, y_test): images (N, 1, 8, 8) in [0, 1], fixed split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    itr, ite = train_test_split(np.arange(len(y)), test_size=0.25, random_state=seed,
                                stratify=d.target)
    return x[itr], y[itr], x[ite], y[ite]


def train_float(model, x, y, *, epochs=15, lr=1e-2, batch=64, seed=0):
    set_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((len(x) + batch - 1) // batch))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def loader(x, y, batch=256):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def run(seed: int = 0, epochs: int = 8, lr: float = 2e-3, batch_size: int = 64,
        config: dict | None = None, float_epochs: int = 15, progress: bool = False) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convs: one thread is as fast, and robust on a busy CPU
    try:
        return _run(seed, epochs, lr, batch_size, config, float_epochs, progress)
    finally:
        torch.set_num_threads(threads)


def _run(seed, epochs, lr, batch_size, config, float_epochs, progress) -> dict:
    t0 = time.time()
    xtr, ytr, xte, yte = digits_split(seed)
    set_seed(seed)
    model = train_float(DigitsCNN(), xtr, ytr, epochs=float_epochs, seed=seed)
    acc_float = evaluate(model, loader(xte, yte))["top1"]

    cfg = xb.CrossbarConfig(**{**DIGITS_CONFIG, **(config or {})})
    xmodel = xb.convert(model, cfg)
    acc_stuck = evaluate(xmodel, loader(xte, yte))["top1"]
    before = xb.reprogram_report(xmodel).to_dict()
    # the same model without stucking: what sorting alone costs (nothing) and saves
    acc_nostuck = evaluate(xb.convert(model, cfg.replace(stuck_slices=0, reprogram_fraction=1.0)),
                           loader(xte, yte))["top1"]

    res = finetune(xmodel, torch.utils.data.TensorDataset(xtr, ytr), loss="ce", epochs=epochs,
                   batch_size=batch_size, lr=lr, opt="adam", sched="cosine", seed=seed,
                   freeze_bn=True, progress=progress)
    acc_ft = evaluate(xmodel, loader(xte, yte))["top1"]
    after = xb.reprogram_report(xmodel).to_dict()
    lost = acc_float - acc_stuck
    out = {
        "config": cfg.to_dict(),
        "seed": seed, "epochs": epochs, "lr": lr, "batch_size": batch_size,
        "train_images": len(ytr), "test_images": len(yte),
        "top1_float": acc_float, "top1_quantized_no_stuck": acc_nostuck,
        "top1_stuck": acc_stuck, "top1_finetuned": acc_ft,
        "recovered_fraction": ((acc_ft - acc_stuck) / lost) if lost > 0 else None,
        "finetune_steps": res.steps, "stuck_cells_checked": res.stuck_cells_checked,
        "loss_first": res.losses[0][1], "loss_last": res.losses[-1][1],
        "before": {k: before[k] for k in ("initial_writes", "writes_per_pass",
                                         "baseline_writes_per_pass", "reduction", "tiles")},
        "after": {k: after[k] for k in ("initial_writes", "writes_per_pass",
                                        "baseline_writes_per_pass", "reduction", "tiles")},
        "seconds": time.time() - t0,
    }
    return out


def table(r: dict) -> str:
    b, a = r["before"], r["after"]
    lines = [
        f"digits CNN, {r['train_images']} train / {r['test_images']} test images, crossbars "
        f"{r['config']['rows']}x{r['config']['cols']}, stuck_slices={r['config']['stuck_slices']}, "
        f"reprogram_fraction={r['config']['reprogram_fraction']}",
        "",
        f"  {'model':<34}{'top-1 %':>9}",
        f"  {'float':<34}{r['top1_float']:>9.2f}",
        f"  {'crossbar, no stucking':<34}{r['top1_quantized_no_stuck']:>9.2f}",
        f"  {'crossbar, stuck':<34}{r['top1_stuck']:>9.2f}",
        f"  {'crossbar, stuck + fine-tuned':<34}{r['top1_finetuned']:>9.2f}",
        "  recovered fraction of the loss: "
        + (f"{r['recovered_fraction']:.3f}" if r["recovered_fraction"] is not None else "n/a"),
        "",
        f"  {'':<26}{'writes/pass':>12}{'baseline':>12}{'reduction':>11}{'initial':>10}",
    ]
    for name, d in (("before fine-tuning", b), ("after fine-tuning", a)):
        red = d["reduction"]
        red = f"{red:.3f}x" if isinstance(red, float) else str(red)
        lines.append(f"  {name:<26}{d['writes_per_pass']:>12,}{d['baseline_writes_per_pass']:>12,}"
                     f"{red:>11}{d['initial_writes']:>10,}")
    lines.append(f"\n  fine-tuning: {r['finetune_steps']} steps, loss {r['loss_first']:.3f} -> "
                 f"{r['loss_last']:.3f}; {r['stuck_cells_checked']:,} stuck cells kept their "
                 f"levels; total {r['seconds']:.1f} s")
    return "\n".join(lines)


def main(argv=None):
    from crossbar_torch.apps.cli import (ArgumentParser, add_progress_args, apply_overrides,
                                    check_output_file, positive_float, positive_int,
                                    show_progress)
    from crossbar_torch.config import parse_overrides
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=positive_int, default=8)
    ap.add_argument("--lr", type=positive_float, default=2e-3)
    ap.add_argument("--batch-size", type=positive_int, default=64)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field of the crossbar configuration")
    ap.add_argument("--json", help="write the results here (atomically)")
    add_progress_args(ap)
    args = ap.parse_args(argv)
    if args.json:
        check_output_file(args.json, "--json")
    apply_overrides(xb.CrossbarConfig(**DIGITS_CONFIG), args.set)  # a bad value: error now
    r = run(args.seed, args.epochs, args.lr, args.batch_size, parse_overrides(args.set),
            progress=show_progress(args))
    print(table(r))
    if args.json:
        atomic_write_text(args.json, json.dumps(r, indent=2) + "\n")
    return r


if __name__ == "__main__":
    from crossbar_torch.apps.cli import run_main
    run_main(main)
