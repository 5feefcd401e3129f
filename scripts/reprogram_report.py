#!/usr/bin/env python
"""Memristor writes of a model on crossbars: configuration against its unsorted baseline.

Examples:
  python scripts/reprogram_report.py --model tf_efficientnet_lite0 --config configs/paper.yaml
  python scripts/reprogram_report.py --model minilm --sweep configs/sweep_paper.yaml --csv out.csv
  python scripts/reprogram_report.py --model resnet50 --pretrained --set stuck_slices=2 --json r.json
  python scripts/reprogram_report.py --sweep configs/sweep_paper.yaml --plot slices.svg

--plot writes the format of its extension (.png, .svg, .pdf, ...). Every output path, the
--include / --exclude patterns and the configurations are checked before any counting; a
mistake is one line `error: ...` (exit status 2).
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import crossbar_torch as xb  # noqa: E402
from crossbar_torch.cli import (ArgumentParser, UsageError, add_config_args,  # noqa: E402
                                add_model_args, add_progress_args, check_output_file,
                                config_from_args, describe_source, model_from_args, one_line,
                                random_weights, random_weights_note, read_yaml, run_main,
                                show_progress)
from crossbar_torch.config import atomic_write, atomic_write_text  # noqa: E402


def load_sweep(paths, overrides):
    """Runs of a sweep: each path is a config YAML, or a sweep YAML {base: {...}, runs: [...]}.
    Run names are made unique (a repeated name gets ' #2', ' #3', ...)."""
    from crossbar_torch.cli import apply_overrides
    runs, seen = [], {}

    def add(name, cfg):
        n = seen.get(name, 0) + 1
        seen[name] = n
        runs.append((name if n == 1 else f"{name} #{n}", cfg))

    for path in paths:
        data = read_yaml(path, "--sweep")
        data = {} if data is None else data
        if isinstance(data, dict) and "runs" in data:
            base = data.get("base") or {}
            if not isinstance(base, dict) or not isinstance(data["runs"], list):
                raise UsageError(f"{path}: a sweep is {{base: {{field: value}}, runs: [{{name: "
                                 "..., field: value}}, ...]}")
            for i, run in enumerate(data["runs"]):
                if not isinstance(run, dict):
                    raise UsageError(f"{path}: runs[{i}] is not a mapping of config fields")
                run = dict(run)
                name = str(run.pop("name", f"run{i}"))
                try:
                    cfg = xb.CrossbarConfig.from_dict({**base, **run})
                except (TypeError, ValueError) as e:
                    raise UsageError(f"{path}: run {name!r}: {one_line(e)}") from None
                add(name, apply_overrides(cfg, overrides))
        elif isinstance(data, dict):
            name = os.path.splitext(os.path.basename(path))[0]
            try:
                cfg = xb.CrossbarConfig.from_dict(data.get("crossbar", data))
            except (TypeError, ValueError) as e:
                raise UsageError(f"{path}: {one_line(e)}") from None
            add(name, apply_overrides(cfg, overrides))
        else:
            raise UsageError(f"{path}: expected a config or a sweep mapping, got "
                             f"{type(data).__name__}")
    return runs


def sweep_table(rows) -> str:
    head = (f"{'run':<28}{'crossbar':>10}{'writes/pass':>14}{'baseline':>14}{'reduction':>11}"
            f"{'initial':>14}{'rows/pass':>12}{'max/cell':>10}")
    lines = [head, "-" * len(head)]
    for name, d in rows:
        red = d["reduction"]
        red = f"{red:.3f}x" if isinstance(red, float) else str(red)
        xbar = f"{d['config']['rows']}x{d['config']['cols']}"
        lines.append(f"{name[:28]:<28}{xbar:>10}{d['writes_per_pass']:>14,}"
                     f"{d['baseline_writes_per_pass']:>14,}{red:>11}{d['initial_writes']:>14,}"
                     f"{d['rows_programmed_per_pass']:>12,}{d['max_cell_writes_per_pass']:>10,}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plot


def plot_formats() -> tuple:
    """File extensions --plot can write (matplotlib's Agg canvas)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError as e:
        raise UsageError(f"--plot needs matplotlib (pip install matplotlib): {e}") from None
    return tuple(sorted(FigureCanvasAgg.get_supported_filetypes()))


def _is_baseline(d: dict) -> bool:
    cfg = xb.CrossbarConfig.from_dict(d["config"])
    return cfg == cfg.baseline()


def plot_series(rows):
    """(slices, series) of the per-slice bar chart. ``slices``: every slice index of any run
    (a two's-complement run has one more than a differential one). ``series``: ``(label,
    values, is_baseline)``, one per run, plus one baseline per distinct baseline configuration
    that no run already is (labelled by what tells the baselines apart, e.g. the encoding)."""
    slices = sorted({int(s) for _, d in rows
                     for s in list(d["per_slice"]) + list(d.get("baseline_per_slice") or {})})
    nan = float("nan")  # a slice the run's encoding does not have: no bar (not a 0 bar)
    series = []
    for name, d in rows:
        series.append((name, [d["per_slice"].get(str(s), nan) for s in slices], _is_baseline(d)))
    # one baseline per distinct baseline configuration, unless a run is that baseline
    bases = {}
    for name, d in rows:
        if d.get("baseline_per_slice") is None:
            continue
        key = json.dumps(xb.CrossbarConfig.from_dict(d["config"]).baseline().to_dict(),
                         sort_keys=True)
        if _is_baseline(d):
            bases[key] = None  # drawn as the run itself
        elif key not in bases:
            bases[key] = d
    extra = [(json.loads(k), d) for k, d in bases.items() if d is not None]
    if extra:
        all_cfgs = [json.loads(k) for k in bases]
        differ = sorted({f for c in all_cfgs for f in c if any(c2[f] != c[f] for c2 in all_cfgs)})
        for cfg, d in extra:
            label = "baseline" + (f" ({', '.join(str(cfg[f]) for f in differ)})"
                                  if differ else "")
            series.append((label, [d["baseline_per_slice"].get(str(s), nan) for s in slices],
                           True))
    labels, out = set(), []
    for label, vals, base in series:  # never two legend entries with the same text
        while label in labels:
            label += "'"
        labels.add(label)
        out.append((label, vals, base))
    return slices, out


def draw(rows):
    """The matplotlib figure of :func:`plot_series` (legend outside the axes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    slices, series = plot_series(rows)
    fig, ax = plt.subplots(figsize=(10, 4.8))
    x = np.arange(len(slices))
    width = 0.8 / len(series)
    cmap = plt.get_cmap("tab10" if len(series) <= 10 else "tab20")
    for i, (name, vals, base) in enumerate(series):
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=name, color=cmap(i % cmap.N),
               hatch="//" if base else None, edgecolor="white" if base else None, linewidth=0)
    ax.set_xticks(x, [f"slice {s}" for s in slices])
    ax.set_ylabel("writes per pass")
    ax.set_title("Memristor writes per pass by bit slice (0 = least significant; hatched = "
                 "baseline)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig, ax


def plot(rows, path) -> None:
    """Write the chart to ``path`` in the format of its extension, atomically (nothing is left
    behind when it fails)."""
    import matplotlib.pyplot as plt
    fmt = os.path.splitext(path)[1].lower().lstrip(".")
    if fmt not in plot_formats():
        raise UsageError(f"--plot {path!r}: unknown image format; use one of "
                         f"{', '.join('.' + e for e in plot_formats())}")
    fig, _ = draw(rows)
    try:
        atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=120, bbox_inches="tight"),
                     binary=True)
    finally:
        plt.close(fig)


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
    def sel(n):
        return ((not include or any(fnmatch.fnmatchcase(n, p) for p in include))
                and not any(fnmatch.fnmatchcase(n, p) for p in exclude or ()))
    chosen = [(n, type(m).__name__) for n, m in model.named_modules() if n and sel(n)]
    why = {n: r for n, _, r in xmodel.crossbar_conversion.skipped}
    what = (f"--include {' '.join(include)}" if include else "the model")
    what += f" (without --exclude {' '.join(exclude)})" if exclude else ""
    if not chosen:
        return f"no layer was converted: {what} selects no layer"
    return (f"no layer was converted: {what} selects only layers that cannot be converted: "
            + ", ".join(f"{n} ({why.get(n, t + ': not a Linear / Conv2d')})"
                        for n, t in chosen[:4]) + (" ..." if len(chosen) > 4 else ""))


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
    add_progress_args(p)
    args = p.parse_args(argv)
    progress = show_progress(args)

    # everything a user can get wrong, before the model is built and counted
    for flag in ("json", "csv"):
        if getattr(args, flag):
            check_output_file(getattr(args, flag), "--" + flag)
    if args.plot:
        check_output_file(args.plot, "--plot", plot_formats())
    runs = (load_sweep(args.sweep, args.overrides) if args.sweep
            else [(os.path.splitext(os.path.basename(args.config))[0] if args.config
                   else "default config", config_from_args(args))])
    model = model_from_args(args)
    check_patterns(model, args.include, args.exclude)
    weights = describe_source(args)
    print(f"model {args.model} ({weights})", file=sys.stderr)
    facts = {"weight_source": weights, "random_weights": random_weights(args)}
    if random_weights(args) and not args.random_init:
        facts["warning"] = random_weights_note(args)

    rows, reports = [], []
    from tqdm.auto import tqdm
    for name, cfg in tqdm(runs, desc="sweep", disable=not progress or len(runs) == 1):
        xmodel = xb.convert(model, cfg, include=args.include, exclude=args.exclude,
                            program=False, progress=progress)
        if not xb.crossbar_layers(xmodel):
            raise UsageError(no_layer_message(model, xmodel, args.include, args.exclude))
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
            w.writerow(["run", "crossbar_rows", "crossbar_cols", "writes_per_pass",
                        "baseline_writes_per_pass", "reduction", "initial_writes",
                        "rows_programmed_per_pass", "max_cell_writes_per_pass", "weight_source",
                        "config"])
            for name, d in rows:
                w.writerow([name, d["config"]["rows"], d["config"]["cols"], d["writes_per_pass"],
                            d["baseline_writes_per_pass"], d["reduction"], d["initial_writes"],
                            d["rows_programmed_per_pass"], d["max_cell_writes_per_pass"],
                            weights, json.dumps(d["config"])])
            atomic_write_text(args.csv, buf.getvalue())
    if args.plot:
        plot(rows, args.plot)
    return rows


if __name__ == "__main__":
    run_main(main)
