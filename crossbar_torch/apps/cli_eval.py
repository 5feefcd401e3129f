"""ImageNet-1K evaluation: float model and crossbar model on the same images, in one run.

Reports top-1 / top-5 of both, their difference, top-1 agreement, throughput, and the reprogram
report (memristor writes per pass against the unsorted baseline) of the configuration.

Examples:
  python scripts/eval_imagenet.py                                  # lite0, bundled photos
  python scripts/eval_imagenet.py --data /datasets/imagenet/val --batch-size 100 --out r.json
  python scripts/eval_imagenet.py --data PATH/TO/imagenet-val-folder --config configs/paper_mild.yaml
  python scripts/eval_imagenet.py --model resnet50 --pretrained --data /datasets/imagenet/val
  python scripts/eval_imagenet.py --checkpoint finetuned.pth --data /datasets/imagenet/val
  torchrun --nproc_per_node 8 scripts/eval_imagenet.py --data /datasets/imagenet/val --out r.json

--model is a timm image classifier (MiniLM, a text model, is for reprogram_report.py). Without
a weight flag a model other than EfficientNet-Lite has RANDOM weights: the output and the JSON
say so ("random_weights": true).
--data is a folder in the ImageNet validation layout <root>/<synset>/<image> (any subset of the
1000 classes; a label comes from its folder's synset). A root holding only val/ is accepted.
--checkpoint may be a plain state dict of the float model, or a fine-tuned crossbar checkpoint
{"model": state dict of the converted model, "crossbar_config": {...}, "model_name": ...} as
scripts/finetune.py writes: then the crossbar model is rebuilt with the saved configuration and
cells, and the "float" column is the checkpoint's latent float weights.
Under torchrun each rank evaluates every world-th image (no duplicates, none dropped), counts
are summed across ranks, and only rank 0 prints and writes --out. With an analog periphery the
input / ADC ranges are calibrated once, by rank 0 on the first --calib-images images, and sent
to every rank (the same ranges whatever the number of ranks; --out lists them: "calibration").
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time


import torch  # noqa: E402

import crossbar_torch as xb  # noqa: E402
from crossbar_torch.apps.cli import (PYPI_LITE, ArgumentParser, UsageError,  # noqa: E402
                                add_config_args, add_model_args, add_preprocess_args,
                                add_progress_args, check_input_dir, check_input_file,
                                check_model_args, check_output_file, config_from_args,
                                describe_source, model_from_args, nonnegative_int, one_line,
                                positive_int, preprocess_overrides, random_weights,
                                random_weights_note, run_main, show_progress)
from crossbar_torch.config import atomic_write_text  # noqa: E402
from crossbar_torch.feedback import needs_moments  # noqa: E402
from crossbar_torch.nn.modules import CROSSBAR_BUFFERS  # noqa: E402
from crossbar_torch.apps.data import (BundledPhotos, ImageNetFolder, UnreadableImageError,  # noqa: E402
                                 collate_skip_bad, data_config_for, resolve_split_root)
from crossbar_torch.apps.distributed import init_distributed  # noqa: E402
from crossbar_torch.apps.evaluate import StridedSampler, evaluate  # noqa: E402

from crossbar_torch.apps._checkout import sample_dev  # noqa: E402

SAMPLE_DEV = sample_dev()  # a hint only


# --------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, minilm=False)
    add_config_args(p)
    d = p.add_argument_group("data")
    d.add_argument("--data", metavar="DIR",
                   help="ImageNet validation folder <root>/<synset>/<image> (default: the real "
                        "photos bundled in scikit-image / scikit-learn / matplotlib)")
    d.add_argument("--limit", type=positive_int, metavar="N",
                   help="only the first N images (sorted order)")
    d.add_argument("--batch-size", type=positive_int, default=50)
    d.add_argument("--calib-images", type=positive_int, default=8, metavar="N",
                   help="with an analog periphery (input_bits, adc_bits, ...): calibrate the "
                        "input and ADC ranges on the first N images (docs/semantics.md rule 20); "
                        "with feedback: hessian, measure the input moments on them and "
                        "reprogram (rule 21)")
    d.add_argument("--workers", type=nonnegative_int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader worker processes (default min(4, cpus))")
    d.add_argument("--skip-bad", action="store_true",
                   help="count, list and skip unreadable images (default: stop with an error)")
    add_preprocess_args(p)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default cuda if available); under "
                                    "torchrun with CUDA each rank uses cuda:LOCAL_RANK")
    p.add_argument("--seed", type=int, default=0,
                   help="torch seed set before building the model, so --random-init weights are "
                        "reproducible and identical on every torchrun rank (default 0)")
    p.add_argument("--out", metavar="JSON", help="write the result as JSON (atomic; rank 0)")
    add_progress_args(p)
    return p


# --------------------------------------------------------------------------- models


def is_crossbar_checkpoint(path) -> "dict | None":
    """The checkpoint dict if ``path`` is a fine-tuned crossbar checkpoint, else None. An
    unreadable file is an error naming it; so is a training checkpoint (it leaves out the
    crossbar cells, which only the original float weights can rebuild)."""
    from crossbar_torch.apps.checkpoint import read_checkpoint
    if not path:
        return None
    obj = read_checkpoint(path)
    if isinstance(obj, dict) and {"model", "crossbar_config"} <= set(obj):
        if "crossbar_fingerprint" in obj:
            raise UsageError(
                f"--checkpoint {path!r} is a training checkpoint of scripts/finetune.py (resume "
                "state, without the crossbar cells): evaluate the run's final.pt, or load it "
                "with crossbar_torch.apps.finetune.load_finetuned and the original float weights")
        return obj
    return None


def models_from_crossbar_checkpoint(ckpt: dict, args, log):
    """(float model from the latent weights, crossbar model with the saved cells, config, name)."""
    import timm
    from crossbar_torch.apps.models.efficientnet_lite import preprocess_config

    from crossbar_torch.apps.checkpoint import state_dict_mismatch

    path = args.checkpoint
    name = ckpt.get("model_name") or args.model
    if name != args.model:
        log(f"note: the checkpoint is of {name!r}; using it (not --model {args.model!r})")
    if args.config or args.overrides:
        log("note: --config / --set are ignored: a crossbar checkpoint carries its configuration")
    try:
        cfg = xb.CrossbarConfig.from_dict(ckpt["crossbar_config"])
    except (TypeError, ValueError) as e:
        raise UsageError(f"--checkpoint {path!r}: its crossbar_config is invalid: "
                         f"{one_line(e)}") from None
    sd = ckpt["model"]
    if not timm.is_model(name.split(".")[0]):
        raise UsageError(f"--checkpoint {path!r} is of model {name!r}, which timm does not know")
    float_model = timm.create_model(name, pretrained=False)
    if name.split(".")[0] in PYPI_LITE:
        float_model.pretrained_cfg = {**float_model.pretrained_cfg, **preprocess_config(name)}
    latent = {k: v for k, v in sd.items() if k.rsplit(".", 1)[-1] not in CROSSBAR_BUFFERS}
    why = state_dict_mismatch(float_model.state_dict(), latent)
    if why:
        raise UsageError(f"--checkpoint {path!r} does not fit {name} (another "
                         f"architecture?): {why}")
    float_model.load_state_dict(latent, strict=True)
    float_model.eval()
    layers = sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith(".cells")})
    xmodel = xb.convert(float_model, cfg, include=layers, program=False)
    try:
        xmodel.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise UsageError(f"--checkpoint {path!r}: {one_line(e, 600)}") from None
    return float_model, xmodel.eval(), cfg, name


# --------------------------------------------------------------------------- data


def resolve_data_root(root: str, log) -> str:
    """Accept a dataset root holding ``val/`` (e.g. imagenet-sample-dev), as finetune.py does."""
    resolved = resolve_split_root(check_input_dir(root, "--data"), "val")
    if resolved != root:
        log(f"using {resolved}")
    return resolved


def build_dataset(args, transform, log):
    if args.data:
        root = resolve_data_root(args.data, log)
        ds = ImageNetFolder(root, transform, skip_bad=True)  # bad files reach evaluate() as records
        label_sets, source = False, root
    else:
        ds = BundledPhotos(transform)
        label_sets, source = True, "bundled photos (scikit-image, scikit-learn, matplotlib)"
    if args.limit is not None:
        ds = torch.utils.data.Subset(ds, range(min(args.limit, len(ds))))
    return ds, label_sets, source


# --------------------------------------------------------------------------- summary


def fmt_pct(v):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:6.2f}%"


def summary(res: dict) -> str:
    f, c = res["float"], res["crossbar"]
    n = res["images"]
    lines = [f"ImageNet evaluation - {res['model']} ({res['weights']})",
             *([f"WARNING: {res['warning']}"] if res.get("warning") else []),
             f"data: {res['data']}  images: {n}"
             + ("  (top-1 = any acceptable class)" if res["label_sets"] else ""),
             f"config: {res['config_summary']}", ""]
    lines.append(f"  {'':<10}{'top-1':>10}{'top-5':>10}{'correct@1':>11}{'img/s':>10}")
    tp = res["throughput"]
    for key, d, ips in (("float", f, tp["float_img_per_s"]), ("crossbar", c, tp["crossbar_img_per_s"])):
        lines.append(f"  {key:<10}{fmt_pct(d['top1']):>10}{fmt_pct(d['top5']):>10}"
                     f"{d['top1_correct']:>7}/{n:<3}{(f'{ips:.1f}' if ips else 'n/a'):>10}")
    dl = res["delta_top1"]
    lines.append(f"  delta top-1 (crossbar - float): {dl:+.2f} points "
                 f"({c['top1_correct'] - f['top1_correct']:+d} images)" if dl == dl else "  delta n/a")
    lines.append(f"  top-1 agreement float vs crossbar: {fmt_pct(res['agreement_top1']).strip()} "
                 f"({res['agreement_top1_count']}/{n})")
    r = res["reprogram"]
    red = r["reduction"]
    red = f"{red:.3f}x" if isinstance(red, float) else str(red)
    lines += ["", f"  reprogram: writes per pass {r['writes_per_pass']:,}, baseline (no sort, no "
                  f"stucking) {r['baseline_writes_per_pass']:,}, reduction {red}; "
                  f"{r['tiles']:,} tiles, initial programming {r['initial_writes']:,} writes"]
    if res["bad_images"]:
        lines.append(f"  skipped {len(res['bad_images'])} unreadable image(s):")
        lines += [f"    {b['path']}: {b['reason']}" for b in res["bad_images"][:20]]
        if len(res["bad_images"]) > 20:
            lines.append(f"    ... ({len(res['bad_images']) - 20} more in --out)")
    if res["label_sets"]:
        lines += ["", "  These are a handful of bundled photos, not ImageNet: to evaluate on a real "
                      "ImageNet validation folder (<root>/<synset>/<image>):",
                  f"    python scripts/eval_imagenet.py --model {res['model']} --data /path/to/imagenet/val "
                  "--batch-size 100 --out result.json",
                  "    torchrun --nproc_per_node <gpus> scripts/eval_imagenet.py --data /path/to/imagenet/val"]
        if SAMPLE_DEV:
            lines.append(f"    python scripts/eval_imagenet.py --data {os.path.relpath(SAMPLE_DEV)}")
    return "\n".join(lines)


def config_summary(cfg) -> str:
    """The configuration on one line: the mapping fields, then every analog field (rules 17
    to 19) that is not ideal, or "analog: ideal"."""
    from dataclasses import fields

    from crossbar_torch.config import ANALOG_FIELDS
    defaults = {f.name: f.default for f in fields(cfg)}
    analog = [f"{k}={getattr(cfg, k)}" for k in ANALOG_FIELDS
              if getattr(cfg, k) != defaults[k]]
    return (f"{cfg.rows}x{cfg.cols}, {cfg.weight_bits}-bit {cfg.encoding}, sort={cfg.sort}, "
            f"filter_order={cfg.filter_order}, stuck_slices={cfg.stuck_slices}, "
            f"reprogram_fraction={cfg.reprogram_fraction}, compensate={cfg.compensate}; "
            f"analog: {', '.join(analog) if analog else 'ideal'}")


# --------------------------------------------------------------------------- main


def run(args) -> dict:
    distributed, rank, world, device = init_distributed(args.device)
    finished = False
    try:
        res = _run(args, distributed, rank, world, device)
        finished = True
        return res
    finally:
        if distributed and torch.distributed.is_initialized():
            if finished:
                # rank 0 still counts writes and writes --out when the others are done: leave
                # together, so no rank tears its gloo / nccl connections down under a peer
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def _run(args, distributed, rank, world, device) -> "dict | None":
    def log(msg):
        if rank == 0:
            print(msg, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    progress = show_progress(args)
    torch.manual_seed(args.seed)  # same random-init weights on every rank and every run
    ckpt = is_crossbar_checkpoint(args.checkpoint)
    if ckpt is not None:
        float_model, xmodel, cfg, name = models_from_crossbar_checkpoint(ckpt, args, log)
        weights = f"crossbar checkpoint {args.checkpoint} (float = its latent weights)"
    else:
        name = args.model
        cfg = config_from_args(args)
        float_model = model_from_args(args)
        weights = describe_source(args)
        log(f"converting {name} ({weights}) to crossbars: {config_summary(cfg)}")
        xmodel = xb.convert(float_model, cfg, program=True, progress=progress and rank == 0)
    dcfg = data_config_for(float_model, preprocess_overrides(args))
    import timm.data
    transform = timm.data.create_transform(**dcfg, is_training=False)
    ds, label_sets, source = build_dataset(args, transform, log)
    if not args.data:
        log("no --data given: evaluating on the real photos bundled in installed packages "
            "(scikit-image, scikit-learn, matplotlib); top-1 counts any acceptable class")
    sampler = StridedSampler(len(ds), rank, world) if distributed else None
    loader = torch.utils.data.DataLoader(
        ds, batch_size=args.batch_size, shuffle=False, sampler=sampler,
        num_workers=args.workers, collate_fn=collate_skip_bad,
        pin_memory=device.type == "cuda", persistent_workers=False)
    float_model.to(device)
    xmodel.to(device)
    calibration = None
    feedback = needs_moments(xmodel)
    if feedback:  # rule 21: every rank measures the same moments and reprograms with them
        calibration = calibrate_once(xmodel, ds, args, device, distributed, rank,
                                     everywhere=True)
        xb.reprogram(xmodel)
        log(f"error feedback (rule 21): input moments measured on the first "
            f"{calibration['images']} image(s), layers reprogrammed")
    elif xmodel_config(xmodel).analog:  # rule 20: the converters' ranges from the first images
        calibration = calibrate_once(xmodel, ds, args, device, distributed, rank)
        log(f"analog periphery: input / ADC ranges calibrated on the first "
            f"{calibration['images']} image(s)" + (" (rank 0, sent to every rank)"
                                                   if world > 1 else ""))
    log(f"evaluating {len(ds)} image(s) on {device}" + (f" x {world} ranks" if world > 1 else ""))
    ev = evaluate({"float": float_model, "crossbar": xmodel}, loader, device,
                  label_sets=label_sets, distributed=distributed, skip_bad=args.skip_bad,
                  progress=progress)
    if rank != 0:
        return None
    log("counting memristor writes (reprogram report)")
    report = xb.reprogram_report(xmodel, model_name=name, progress=progress).to_dict()
    f, c = ev["models"]["float"], ev["models"]["crossbar"]
    res = {
        "model": name,
        "weights": weights,
        "random_weights": ckpt is None and random_weights(args),
        **({"warning": random_weights_note(args)}
           if ckpt is None and random_weights(args) and not args.random_init else {}),
        "data": source,
        "label_sets": label_sets,
        "images": ev["images"],
        "float": {k: f[k] for k in ("top1", "top5", "top1_correct", "top5_correct")},
        "crossbar": {k: c[k] for k in ("top1", "top5", "top1_correct", "top5_correct")},
        "delta_top1": c["top1"] - f["top1"],
        "agreement_top1": ev["agreement_top1"],
        "agreement_top1_count": ev["agreement_top1_count"],
        "reprogram": report,
        "config": cfg.to_dict(),
        "config_summary": config_summary(cfg),
        "bad_images": ev["bad_images"],
        "throughput": {"float_img_per_s": f["img_per_s"], "crossbar_img_per_s": c["img_per_s"],
                       "float_seconds": f["seconds"], "crossbar_seconds": c["seconds"],
                       "batch_size": args.batch_size, "device": str(device), "world_size": world,
                       "threads": torch.get_num_threads()},
        "preprocessing": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dcfg.items()},
        "calibration": calibration,
        "limit": args.limit,
        "wall_seconds": time.perf_counter() - t_start,
    }
    print(summary(res), flush=True)
    if args.out:
        atomic_write_text(args.out, json.dumps(_json_safe(res), indent=2) + "\n")
        log(f"wrote {args.out}")
    return res


def calibrate_once(xmodel, ds, args, device, distributed, rank, everywhere=False) -> dict:
    """Rule 20 on the first ``--calib-images`` readable images of the data set (not of a rank's
    share of it): rank 0 calibrates and sends the ranges to every rank, so the result does not
    depend on the number of ranks. With ``everywhere`` (rule 21's input moments, too large to
    send) every rank calibrates on those same images. Returns ``{"images": n, "layers": {name:
    {"input_range", "adc_range"}}}``."""
    from crossbar_torch.nn.calibration import calibrate_from_loader
    layers = xb.crossbar_layers(xmodel)
    msg, error = [None], None
    if everywhere:
        distributed = False  # every rank computes the same calibration itself
    if rank == 0 or everywhere:
        loader = torch.utils.data.DataLoader(
            ds, batch_size=min(args.batch_size, args.calib_images), shuffle=False,
            num_workers=0, collate_fn=collate_skip_bad)
        try:
            n = calibrate_from_loader(xmodel, loader, device, args.calib_images)
            msg = [{"images": n, "layers": {
                name: {"input_range": l.input_range.tolist(), "adc_range": l.adc_range.tolist()}
                for name, l in layers}}]
        except Exception as e:  # every rank stops: rank 0 with the error, the others told so
            error, msg = e, [{"error": one_line(e)}]
    if distributed:
        torch.distributed.broadcast_object_list(msg, src=0)
    if error is not None:
        raise error
    out = msg[0]
    if "error" in out:
        raise UsageError(f"rank 0 could not calibrate: {out['error']}")
    if rank != 0 and not everywhere:
        for name, l in layers:
            got = out["layers"][name]
            l.input_range = l.input_range.new_tensor(got["input_range"])
            l.adc_range = l.adc_range.new_tensor(got["adc_range"])
    return out


def _json_safe(o):
    """NaN (no images scored) and infinities become null: JSON has neither."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    return o


def check_args(args) -> None:
    """Every path, the preprocessing flags and the model, before any work starts (one-line
    errors)."""
    if args.data:
        check_input_dir(args.data, "--data")
        # the folder holds images in the expected layout (a listing; read again by the run)
        ImageNetFolder(resolve_split_root(args.data, "val"), None, skip_bad=True)
    preprocess_overrides(args)  # --crop-pct out of range
    if args.out:
        check_output_file(args.out, "--out")
    if args.config:
        check_input_file(args.config, "--config")
    if args.checkpoint:
        check_input_file(args.checkpoint, "--checkpoint")
    else:
        check_model_args(args)


def xmodel_config(xmodel):
    layers = xb.crossbar_layers(xmodel)
    return layers[0][1].config if layers else xb.CrossbarConfig()


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    try:
        return run(args)
    except UnreadableImageError as e:  # every rank raises it; run_main prints it on rank 0
        raise UsageError(f"{e} (pass --skip-bad to count, list and skip unreadable "
                         "images)") from e


def entry_point():
    """Console entry point (pyproject.toml [project.scripts])."""
    run_main(main)


if __name__ == "__main__":
    entry_point()
