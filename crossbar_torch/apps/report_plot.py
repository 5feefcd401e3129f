"""The chart of ``crossbar-report --plot``: writes per pass by slice for every run (with its
baseline), the cells' write histogram and the per-layer writes; written atomically in the
format of the file's extension."""
from __future__ import annotations

import json
import os

import crossbar_torch as xb
from crossbar_torch.apps.cli import UsageError
from crossbar_torch.config import atomic_write
from crossbar_torch.report import format_count


def _n(v) -> str:
    """A count, or a wear-levelling period's average per pass (one decimal)."""
    return format_count(v, 1)


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
