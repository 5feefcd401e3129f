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
                                add_model_args, add_progress_args, check_output_file,
                                config_from_args, describe_source, model_from_args, one_line,
                                random_weights, random_weights_note, run_main,
                                show_progress)
from crossbar_torch.config import atomic_write, atomic_write_text  # noqa: E402
from crossbar_torch.device import known_devices  # noqa: E402
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


PER_LAYER_RUNS = 4  # the per-layer panel draws at most this many runs (bars get too thin)


def _run_colours(n_series: int):
    """Colour of series ``i`` (runs first, then extra baselines), shared by every panel."""
    import matplotlib.pyplot as plt
    cmap = plt.get_cmap("tab10" if n_series <= 10 else "tab20")
    return lambda i: cmap(i % cmap.N)


def _wide(values) -> bool:
    """Positive values spanning more than 30x: a log axis shows the small ones too."""
    pos = [v for v in values if v is not None and v == v and v > 0]
    return len(pos) > 1 and max(pos) > 30 * min(pos)


def hist_label(name: str, d: dict) -> str:
    """Legend text of a run in the per-cell histogram: its max and the device lifetime."""
    mx, first = d.get("max_cell_writes_per_pass"), d.get("passes_to_first_failure")
    device = (d.get("device") or {}).get("name", "?")
    if not mx:
        return f"{name}: no cell written, never wears"
    life = (f"first failure after {_n(first)} passes on {device}" if first is not None
            else f"never wears on {device}")
    gain = d.get("lifetime_gain")
    if isinstance(gain, (int, float)) and not _is_baseline(d):
        life += f", {gain:.2f}x baseline life"
    period = d.get("period_passes") or 1
    avg = f", average over {period} passes" if period > 1 else ""
    return f"{name}: max {_n(mx)} writes/pass{avg}, {life}"


def draw_cell_histogram(ax, rows, colour) -> None:
    """Per-cell writes per pass of each run: the stored 40-bin histogram as a step line (log
    y), a dotted vertical line at the run's max."""
    drew = False
    for i, (name, d) in enumerate(rows):
        h = (d.get("cell_writes_per_pass") or {}).get("histogram") or {}
        edges, counts = h.get("bin_edges") or [], h.get("counts") or []
        label = hist_label(name, d)
        if len(counts) == 0 or len(edges) != len(counts) + 1:
            ax.plot([], [], color=colour(i), label=label)  # legend entry only
            continue
        ax.stairs(counts, edges, color=colour(i), linewidth=1.6, label=label)
        mx = d.get("max_cell_writes_per_pass")
        if mx:
            ax.axvline(mx, color=colour(i), linestyle=":", linewidth=1.4)
        drew = True
    ax.set_yscale("log")
    if drew:
        ax.set_ylim(bottom=0.7)  # a bin of 1 cell stays visible; empty bins drop to the floor
    ax.set_xlim(left=0)
    ax.set_xlabel("writes per pass of one cell")
    ax.set_ylabel("worn cells (log scale)")
    ax.set_title("Wear of the cells: worn cells (written at least once) by writes per pass, "
                 "40 equal bins from 0 to each run's max (dotted line)", fontsize=10)
    ax.grid(axis="y", which="major", alpha=0.3)
    # below the axes: the labels are long, beside the axes they would squeeze all panels
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.17), borderaxespad=0.0,
              frameon=False)


def draw_layers(ax, rows, colour):
    """Per layer (model order): writes per pass of each run as grouped bars (left axis) and
    the max writes of one of the layer's cells per pass as markers (twin right axis). At most
    ``PER_LAYER_RUNS`` runs; its legend is the figure's, at the bottom (constrained layout).
    Returns the twin axis."""
    import numpy as np
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    shown = rows[:PER_LAYER_RUNS]
    names = [l["name"] for l in shown[0][1]["layers"]] if shown else []
    n = max((len(d["layers"]) for _, d in shown), default=0)
    x = np.arange(n)
    width = 0.8 / max(len(shown), 1)
    twin = ax.twinx()
    nan = float("nan")
    writes, maxes = [], []
    for i, (name, d) in enumerate(shown):
        w = [float(l["writes_per_pass"]) for l in d["layers"]] + [nan] * (n - len(d["layers"]))
        m = [nan if l.get("max_cell_writes_per_pass") is None
             else float(l["max_cell_writes_per_pass"]) for l in d["layers"]]
        m += [nan] * (n - len(m))
        pos = x + i * width - 0.4 + width / 2
        ax.bar(pos, w, width, color=colour(i), linewidth=0, label=name)
        twin.plot(pos, m, linestyle="none", marker="D", markersize=3.5 if n > 30 else 5,
                  markerfacecolor=colour(i), markeredgecolor="black", markeredgewidth=0.6)
        writes += w
        maxes += m
    log_w, log_m = _wide(writes), _wide(maxes)
    if log_w:
        ax.set_yscale("log")
    if log_m:
        twin.set_yscale("log")
    elif not any(v == v for v in maxes):  # nothing counted: an empty, labelled axis
        twin.set_ylim(0, 1)
    ax.set_ylabel("writes per pass" + (" (log scale)" if log_w else ""))
    twin.set_ylabel("max writes of one cell per pass" + (" (log)" if log_m else ""))
    if n <= 30:
        ax.set_xticks(x, names, rotation=90, fontsize=7)
        ax.set_xlabel("layer (model order)")
    else:
        step = next(s for s in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 10 ** 9)
                    if n / s <= 26)
        ax.set_xticks(x[::step], [str(int(v)) for v in x[::step]])
        ax.set_xlabel("layer (index in model order; names: --layers / --csv)")
    ax.set_xlim(-0.6, n - 0.4)
    ax.grid(axis="y", which="major", alpha=0.3)
    more = (f" (first {len(shown)} of {len(rows)} runs)" if len(rows) > len(shown) else "")
    ax.set_title("Per layer: writes per pass (bars, left axis) and max writes of one of its "
                 f"cells per pass (diamonds, right axis){more}", fontsize=10)
    if not any(v == v for v in maxes):
        ax.text(0.99, 0.97, "max writes of one cell: not counted for these layers",
                transform=ax.transAxes, ha="right", va="top", fontsize=8)
    # legend rows: the runs, then what bars and diamonds are (matplotlib fills columns first)
    runs = [Patch(color=colour(i), label=name) for i, (name, _) in enumerate(shown)]
    kinds = [Patch(color="0.6", label="bars: writes per pass (left axis)"),
             Line2D([], [], linestyle="none", marker="D", markerfacecolor="0.6",
                    markeredgecolor="black", label="diamonds: max writes of one cell per pass "
                    "(right axis)")]
    ncol = max(len(runs), len(kinds))
    blank = Patch(visible=False, label=" ")
    grid = [runs + [blank] * (ncol - len(runs)), kinds + [blank] * (ncol - len(kinds))]
    handles = [grid[r][c] for c in range(ncol) for r in range(2)]
    # the figure's bottom, under this last panel and its (maybe rotated) layer names; the
    # right side holds the twin axis
    ax.figure.legend(handles=handles, fontsize=8, loc="outside lower center", ncol=ncol,
                     frameon=False)
    return twin


def draw(rows):
    """The figure of ``--plot``, three panels stacked: writes per pass by bit slice
    (:func:`plot_series`), the per-cell writes histogram (:func:`draw_cell_histogram`) and the
    per-layer writes and max-cell writes (:func:`draw_layers`). Every run has one colour in
    all three; legends sit outside the axes. Returns ``(fig, ax)`` with ``ax`` the per-slice
    axes; ``fig.axes`` is ``[slices, cell histogram, layers, layers' right axis]``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    slices, series = plot_series(rows)
    colour = _run_colours(len(series))  # runs are the first len(rows) series
    n_layers = max((len(d["layers"]) for _, d in rows[:PER_LAYER_RUNS]), default=0)
    fig, (ax, hax, lax) = plt.subplots(
        3, 1, figsize=(11, 13.5 if n_layers <= 30 else 13), layout="constrained",
        gridspec_kw={"height_ratios": [1, 1, 1.35 if n_layers <= 30 else 1.1]})
    x = np.arange(len(slices))
    width = 0.8 / len(series)
    for i, (name, vals, base) in enumerate(series):
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=name, color=colour(i),
               hatch="//" if base else None, edgecolor="white" if base else None, linewidth=0)
    ax.set_xticks(x, [f"slice {s}" for s in slices])
    ax.set_ylabel("writes per pass")
    ax.set_title("Memristor writes per pass by bit slice (0 = least significant; hatched = "
                 "baseline)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    draw_cell_histogram(hax, rows, colour)
    draw_layers(lax, rows, colour)
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
