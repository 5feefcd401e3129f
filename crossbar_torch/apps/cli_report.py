"""Memristor writes of a model on crossbars: configuration against its unsorted baseline.

Examples:
  python scripts/reprogram_report.py --model tf_efficientnet_lite0 --config configs/paper.yaml
  python scripts/reprogram_report.py --model minilm --sweep configs/sweep_paper.yaml --csv out.csv
  python scripts/reprogram_report.py --model mpnet   # all-mpnet-base-v2 (ViT-Base-sized, PyPI parts)
  python scripts/reprogram_report.py --model resnet50 --pretrained --set stuck_slices=2 --json r.json
  python scripts/reprogram_report.py --sweep configs/sweep_paper.yaml --plot slices.svg
  python scripts/reprogram_report.py --config configs/sorted.yaml --memristor rram --plot wear.png

--plot writes the format of its extension (.png, .svg, .pdf, ...). Every output path, the
--include / --exclude patterns and the configurations are checked before any counting; a
mistake is one line `error: ...` (exit status 2). --memristor picks the memristor device
(lifetime, energy, write time); --device, the torch device of the other scripts, is refused
here (counting runs on the CPU). --sweep with --config is refused (a sweep holds its own
configurations; --set applies to every run). --seed (default 0) makes --random-init weights
reproducible. --sweep takes sweep YAMLs {base: {fields}, runs: [{name: ..., field: value}, ...]}
and plain config YAMLs (one run, named after the file), under the rules of
crossbar_torch/apps/sweep.py, shared with frontier.py: unknown keys and a run name used twice
(in one file or across files) are refused, naming the key or both files.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import warnings


import crossbar_torch as xb  # noqa: E402
from crossbar_torch.apps.cli import (ArgumentParser, UsageError, add_config_args,  # noqa: E402
                                add_model_args, add_progress_args,
                                check_output_file, is_sentence_model,
                                config_from_args, describe_source, model_from_args, one_line,
                                random_weights, random_weights_note, run_main,
                                show_progress)
from crossbar_torch.apps.cli_calibration import (add_calibration_args,  # noqa: E402
                                            calibration_sentences, refuse_for_images)
from crossbar_torch.config import atomic_write_text  # noqa: E402
from crossbar_torch.device import known_devices  # noqa: E402
from crossbar_torch.apps.report_plot import (PER_LAYER_RUNS, draw, hist_label, plot,  # noqa: E402,F401
                                             plot_formats, plot_series)
from crossbar_torch.report import format_count, si  # noqa: E402


def load_sweep(paths, overrides):
    """The runs of ``--sweep`` as ``(name, config)``: read by the one sweep loader,
    :func:`crossbar_torch.apps.sweep.load_sweep`, under its rules (sweeps ``{base, runs}`` or
    plain config files; unknown keys and repeated run names refused, naming the files)."""
    from crossbar_torch.apps.sweep import load_sweep as load
    return [(r.name, r.config) for r in load(paths, overrides)]


def _n(v) -> str:
    """A count, or a wear-levelling period's average per pass (one decimal)."""
    return format_count(v, 1)


def sweep_table(rows) -> str:
    head = (f"{'run':<28}{'crossbar':>10}{'writes/pass':>14}{'baseline':>14}{'reduction':>11}"
            f"{'initial':>14}{'rows/pass':>12}{'max/cell':>10}{'life (passes)':>15}"
            f"{'gain':>8}{'energy/pass':>13}  device")
    lines = [head, "-" * len(head)]
    for name, d in rows:
        red, gain = d["reduction"], d["lifetime_gain"]
        red = f"{red:.3f}x" if isinstance(red, float) else str(red)
        gain = f"{gain:.2f}x" if isinstance(gain, float) else str(gain)
        xbar = f"{d['config']['rows']}x{d['config']['cols']}"
        lines.append(f"{name[:28]:<28}{xbar:>10}{_n(d['writes_per_pass']):>14}"
                     f"{_n(d['baseline_writes_per_pass']):>14}{red:>11}"
                     f"{_n(d['initial_writes']):>14}{_n(d['rows_programmed_per_pass']):>12}"
                     f"{_n(d['max_cell_writes_per_pass']):>10}"
                     f"{_n(d['passes_to_first_failure']):>15}{gain:>8}"
                     f"{si(d['write_energy_per_pass_j'], 'J'):>13}  {d['device']['name']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- layers


def check_patterns(model, include, exclude) -> None:
    """--include / --exclude patterns that match no module name are errors, before counting."""
    names = [n for n, _ in model.named_modules() if n]
    for flag, pats in (("--include", include), ("--exclude", exclude)):
        for pat in pats or ():
            if not any(fnmatch.fnmatchcase(n, pat) for n in names):
                raise UsageError(f"{flag} {pat!r} matches no layer of the model (names look "
                                 f"like {', '.join(names[:3])}, ...; patterns are globs on the "
                                 "full name, e.g. 'blocks.*')")


def no_layer_message(model, xmodel, include, exclude) -> str:
    """Why a conversion gave no crossbar layer, naming the patterns and what they matched."""
    def included(n):
        return not include or any(fnmatch.fnmatchcase(n, p) for p in include)

    def excluded(n):
        return any(fnmatch.fnmatchcase(n, p) for p in exclude or ())
    named = [(n, type(m).__name__) for n, m in model.named_modules() if n]
    chosen = [(n, t) for n, t in named if included(n) and not excluded(n)]
    why = {n: r for n, _, r in xmodel.crossbar_conversion.skipped}
    what = (f"--include {' '.join(include)}" if include else "the model")
    if not chosen:
        n_in = sum(included(n) for n, _ in named)
        if exclude and n_in:
            return (f"no layer was converted: --exclude {' '.join(exclude)} removes every one "
                    f"of the {n_in} module(s) "
                    + (f"{what} selects" if include else "of the model"))
        return f"no layer was converted: {what} selects no layer"
    what += f" minus --exclude {' '.join(exclude)}" if exclude else ""
    return (f"no layer was converted: {what} selects only layers that cannot be converted: "
            + ", ".join(f"{n} ({why.get(n, t + ': not a Linear / Conv2d')})"
                        for n, t in chosen[:4]) + (" ..." if len(chosen) > 4 else ""))


def calibrate_feedback(xmodel, args, name: str) -> None:
    """Rule 21 / 23 configs (feedback) program from input moments: without them the counts are
    those of a programming that ignores the preset's point. A sentence model calibrates on
    ``args.feedback_text`` (``--calibration``, as the frontier tool does), then reprograms; an image
    model has no calibration data in this script: one line saying where to count it."""
    from crossbar_torch.apps.cli import (calibrate_gains_on_text, is_sentence_model,
                                         sentence_encoder)
    from crossbar_torch.feedback import needs_moments
    if not needs_moments(xmodel):
        return
    if not is_sentence_model(args.model):
        raise UsageError(f"{args.config or name}: feedback='hessian' (rule 21) programs from "
                         "input moments measured on calibration images, which this script does "
                         "not read; "
                         "count it with scripts/eval_imagenet.py or scripts/frontier.py")
    text, encode = args.feedback_text, sentence_encoder(args.model)
    xb.reprogram(xmodel)  # calibration runs the model: it must hold cells first
    xb.calibrate(xmodel, run=lambda m: encode(m, text))
    calibrate_gains_on_text(xmodel, args.model, text)  # rule 26, where the config asks
    xb.reprogram(xmodel)


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_config_args(p)
    p.add_argument("--sweep", nargs="+", metavar="YAML",
                   help="config YAMLs and/or sweep YAMLs ({base, runs}); one table row each")
    p.add_argument("--include", action="append", help="glob of layer names to convert")
    p.add_argument("--exclude", action="append", help="glob of layer names to leave alone")
    p.add_argument("--json", metavar="PATH", help="write the report(s) as JSON (atomic)")
    p.add_argument("--csv", metavar="PATH", help="write per-layer CSV (sweep: one row per run)")
    p.add_argument("--plot", metavar="FILE",
                   help="bar chart of writes per slice; the extension picks the format "
                        "(.png, .svg, .pdf, ...)")
    p.add_argument("--layers", action="store_true", help="print the per-layer table too")
    p.add_argument("--memristor", metavar="NAME|YAML",
                   help="memristor device for lifetime, energy and time (a preset: "
                        f"{', '.join(known_devices())}; or a device YAML); same as --set "
                        "device=...")
    # --device is the torch device in the other scripts; this one counts on the CPU
    p.add_argument("--device", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0,
                   help="torch seed set before building the model, so --random-init weights "
                        "(and their counts) are reproducible (default 0)")
    add_calibration_args(p)
    add_progress_args(p)
    args = p.parse_args(argv)
    progress = show_progress(args)
    if args.device is not None:
        raise UsageError(f"--device {args.device}: reprogram_report.py has no torch device (it "
                         "counts writes on the CPU); the memristor device is --memristor "
                         f"NAME|YAML ({', '.join(known_devices())}, or a device YAML)")
    if args.sweep and args.config:
        raise UsageError(f"--config {args.config} with --sweep: every run of a sweep has its "
                         "own configuration; put these fields in the sweep's base (or give "
                         "them with --set, which applies to every run)")
    if args.memristor:  # after the other overrides, so it wins for every run of a sweep
        from crossbar_torch.device import load_device
        try:
            load_device(args.memristor)
        except ValueError as e:
            raise UsageError(f"--memristor {args.memristor}: {one_line(e)}") from None
        args.overrides = list(args.overrides) + [f"device={args.memristor}"]

    # everything a user can get wrong, before the model is built and counted
    for flag in ("json", "csv"):
        if getattr(args, flag):
            check_output_file(getattr(args, flag), "--" + flag)
    if args.plot:
        check_output_file(args.plot, "--plot", plot_formats())
    if is_sentence_model(args.model):
        args.feedback_text = calibration_sentences(args)
    else:
        refuse_for_images(args, "has no calibration sentences")
        args.feedback_text = None
    runs = (load_sweep(args.sweep, args.overrides) if args.sweep
            else [(os.path.splitext(os.path.basename(args.config))[0] if args.config
                   else "default config", config_from_args(args))])
    import torch
    torch.manual_seed(args.seed)  # the same --random-init weights on every run
    model = model_from_args(args)
    check_patterns(model, args.include, args.exclude)
    weights = describe_source(args)
    facts = {"weight_source": weights, "random_weights": random_weights(args)}
    if random_weights(args) and not args.random_init:
        facts["warning"] = random_weights_note(args)

    rows, reports = [], []
    from tqdm.auto import tqdm
    for name, cfg in tqdm(runs, desc="sweep", disable=not progress or len(runs) == 1):
        with warnings.catch_warnings():  # no_layer_message says it better, as the error
            warnings.filterwarnings("ignore", message="convert: no layer was converted")
            xmodel = xb.convert(model, cfg, include=args.include, exclude=args.exclude,
                                program=False, progress=progress)
        if not xb.crossbar_layers(xmodel):
            raise UsageError(no_layer_message(model, xmodel, args.include, args.exclude))
        calibrate_feedback(xmodel, args, name)
        if not rows:  # the layers are chosen: now say what is counted
            print(f"model {args.model} ({weights})", file=sys.stderr)
        rep = xb.reprogram_report(xmodel, progress=progress, model_name=args.model)
        reports.append(rep)
        rows.append((name, {**rep.to_dict(), **facts}))
        del xmodel
    if len(runs) == 1:
        rep = reports[0]
        text = str(rep)
        if not args.layers:
            text = text.split("\n\n  layer")[0]
        if facts.get("warning"):
            text = f"WARNING: {facts['warning']}\n" + text
        print(text)
        if args.json:
            atomic_write_text(args.json, json.dumps(rows[0][1], indent=2) + "\n")
        if args.csv:
            rep.to_csv(args.csv)
    else:
        print(f"model {args.model} ({weights}): {rows[0][1]['layer_count']} layers, "
              f"{rows[0][1]['weights']:,} weights")
        if facts.get("warning"):
            print(f"WARNING: {facts['warning']}")
        print(sweep_table(rows))
        if args.json:
            atomic_write_text(args.json, json.dumps({name: d for name, d in rows}, indent=2) + "\n")
        if args.csv:
            import csv
            import io
            buf = io.StringIO()
            w = csv.writer(buf)
            wear = ["wear_leveling", "period_passes", "passes_to_first_failure",
                    "passes_to_1pct_failure", "baseline_passes_to_first_failure",
                    "lifetime_gain", "set_energy_per_pass_j", "reset_energy_per_pass_j",
                    "write_energy_per_pass_j", "write_time_per_pass_s",
                    "baseline_write_energy_per_pass_j", "baseline_write_time_per_pass_s"]
            w.writerow(["run", "crossbar_rows", "crossbar_cols", "writes_per_pass",
                        "baseline_writes_per_pass", "reduction", "initial_writes",
                        "rows_programmed_per_pass", "max_cell_writes_per_pass",
                        "p50_cell_writes_per_pass", "p99_cell_writes_per_pass", *wear,
                        "device", "weight_source", "config"])
            for name, d in rows:
                w.writerow([name, d["config"]["rows"], d["config"]["cols"], d["writes_per_pass"],
                            d["baseline_writes_per_pass"], d["reduction"], d["initial_writes"],
                            d["rows_programmed_per_pass"], d["max_cell_writes_per_pass"],
                            d["cell_writes_per_pass"]["p50"], d["cell_writes_per_pass"]["p99"],
                            *["" if d[k] is None else d[k] for k in wear],
                            d["device"]["name"], weights, json.dumps(d["config"])])
            atomic_write_text(args.csv, buf.getvalue())
    if args.plot:
        plot(rows, args.plot)
    return rows


def entry_point():
    """Console entry point (pyproject.toml [project.scripts])."""
    run_main(main)


if __name__ == "__main__":
    entry_point()
