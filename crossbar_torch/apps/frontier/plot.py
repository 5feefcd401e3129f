"""The frontier figure: reduction of writes (x, log) against the drop from the reference row
(y), the Pareto front marked, every point labelled where its label covers nothing
(:func:`plot_frontier`, :func:`draw_frontier`)."""
from __future__ import annotations

import math
import os
from typing import Sequence

from ...config import CrossbarConfig, atomic_write
from .metrics import pareto_front
from .sweeps import REFERENCE

def _category(cfg: CrossbarConfig) -> str:
    """The legend group of a row: what makes it lose accuracy (stucking, the analog
    periphery: DAC, ADC, finite g_ratio, noise or drift; rule 23's write penalty, which moves
    weights to save writes, with or without stucking, with rule 24's sweeps, and with rule 25's
    or rule 26's filter weights), or nothing
    (lossless)."""
    if cfg.stucking and cfg.analog:
        return "stucking + analog periphery"
    if cfg.analog:
        return "analog periphery (DAC / ADC / noise), no stucking"
    if _write_aware(cfg):
        weights = cfg.values_anywhere("filter_weight")
        if "gain" in weights:
            return "write-aware feedback, output gains (rules 23, 26)"
        if weights != {"lsb"}:
            return "write-aware feedback, filter weights (rules 23, 25)"
        if _anywhere(cfg, "feedback_sweeps"):
            return "write-aware feedback + sweeps (rules 23, 24)"
        return "write-aware feedback (rule 23)"
    if not cfg.stucking:
        return "lossless (no stucking)"
    return "stucking + compensation" if cfg.compensate else "stucking, no compensation"


def _write_aware(cfg: CrossbarConfig) -> bool:
    return _anywhere(cfg, "write_penalty")


def _anywhere(cfg: CrossbarConfig, field: str) -> bool:
    """``field`` is above 0 in the config or in one of its rule-22 overrides."""
    return any(float(v) > 0 for v in cfg.values_anywhere(field))


_STYLE = {"lossless (no stucking)": ("tab:blue", "o"),
          "write-aware feedback (rule 23)": ("tab:cyan", "P"),
          "write-aware feedback + sweeps (rules 23, 24)": ("tab:olive", "X"),
          "write-aware feedback, filter weights (rules 23, 25)": ("tab:brown", "*"),
          "write-aware feedback, output gains (rules 23, 26)": ("tab:pink", "p"),
          "analog periphery (DAC / ADC / noise), no stucking": ("tab:orange", "D"),
          "stucking + compensation": ("tab:green", "s"),
          "stucking, no compensation": ("tab:red", "^"),
          "stucking + analog periphery": ("tab:purple", "v")}


def _box_distance(box, p) -> float:
    dx = max(box[0] - p[0], 0.0, p[0] - box[2])
    dy = max(box[1] - p[1], 0.0, p[1] - box[3])
    return math.hypot(dx, dy)


def _place_labels(ax, xy_px, texts, fontsize, obstacles=()):
    """Put each label next to its point where it overlaps no other label and no point
    (display coordinates), trying offsets of growing distance; a leader line when far."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    axbox = ax.get_window_extent(renderer)
    dpi = fig.dpi / 72.0
    placed = list(obstacles)  # bboxes (x0, y0, x1, y1) in pixels
    pts = [(x - 5 * dpi, y - 5 * dpi, x + 5 * dpi, y + 5 * dpi) for x, y in xy_px]
    dirs = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)]
    anns = []

    def overlap(a, b):
        w = min(a[2], b[2]) - max(a[0], b[0])
        h = min(a[3], b[3]) - max(a[1], b[1])
        return w * h if w > 0 and h > 0 else 0.0

    order = sorted(range(len(texts)), key=lambda i: (xy_px[i][0], xy_px[i][1]))
    for i in order:
        x, y = xy_px[i]
        t = ax.text(0, 0, texts[i], fontsize=fontsize)
        bb = t.get_window_extent(renderer)
        tw, th = bb.width, bb.height
        t.remove()
        best = None
        for dist in (6, 10, 16, 24, 34, 46, 60, 80):
            for dx, dy in dirs:
                ox, oy = dx * dist * dpi, dy * dist * dpi
                x0 = x + ox + (0 if dx > 0 else -tw if dx < 0 else -tw / 2)
                y0 = y + oy + (0 if dy > 0 else -th if dy < 0 else -th / 2)
                box = (x0, y0, x0 + tw, y0 + th)
                cost = sum(overlap(box, p) for p in placed) + sum(
                    overlap(box, p) for j, p in enumerate(pts) if j != i)
                outside = (max(0, axbox.x0 - box[0]) + max(0, box[2] - axbox.x1)
                           + max(0, axbox.y0 - box[1]) + max(0, box[3] - axbox.y1))
                cost += outside * th * 10
                if best is None or cost < best[0] - 1e-9:
                    best = (cost, box, ox, oy, dx, dy, dist)
            if best[0] == 0:
                break
        cost, box, ox, oy, dx, dy, dist = best
        placed.append(box)
        ha = "left" if dx > 0 else "right" if dx < 0 else "center"
        va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
        # a leader line when the label is far, or when another point is about as close to it
        # as its own (so no label reads as another point's)
        own = _box_distance(box, (x, y))
        near = min((_box_distance(box, q) for j, q in enumerate(xy_px) if j != i),
                   default=float("inf"))
        arrow = dict(arrowstyle="-", color="0.55", lw=0.6, shrinkA=0, shrinkB=3) \
            if dist >= 10 or near < own + 12 * dpi else None
        anns.append(ax.annotate(texts[i], xy=ax.transData.inverted().transform((x, y)),
                                xytext=(ox / dpi, oy / dpi), textcoords="offset points",
                                ha=ha, va=va, fontsize=fontsize, arrowprops=arrow))
    return anns


def plot_frontier(rows: Sequence[dict], path: str, scorer_cls, *, title: str = "") -> None:
    """Reduction (x, log) against the drop from the reference (y); Pareto front, labels:
    :func:`draw_frontier` written to ``path`` as a PNG (atomically)."""
    import matplotlib.pyplot as plt
    fig = draw_frontier(rows, scorer_cls, title=title)
    try:
        tmp_dir = os.path.dirname(os.path.abspath(path))
        os.makedirs(tmp_dir, exist_ok=True)
        atomic_write(path, lambda f: fig.savefig(f, format="png"), binary=True)
    finally:
        plt.close(fig)


def draw_frontier(rows: Sequence[dict], scorer_cls, *, title: str = ""):
    """The frontier figure (see :func:`plot_frontier`); its legend sits outside the axes, so
    it covers no point. The caller closes it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import (FixedLocator, FuncFormatter, LogLocator, NullFormatter,
                                   NullLocator)

    sentence = scorer_cls.kind == "sentence"
    pts = []
    for r in rows:
        x = r.get("reduction")
        if sentence:
            y = None if r.get("cosine_mean") is None else 1.0 - r["cosine_mean"]
        else:
            y = r.get(scorer_cls.drop)
        if x is None or y is None or not math.isfinite(x) or not math.isfinite(y):
            continue
        pts.append((r, x, y))
    extra = max(0, len(rows) - 15)  # more room for more labels
    fig, ax = plt.subplots(figsize=(11 + 0.08 * extra, 6.5 + 0.08 * extra), dpi=110)
    if not pts:
        ax.text(0.5, 0.5, "no finite points to plot", ha="center", transform=ax.transAxes)
    else:
        if sentence:
            ymin = min(max(y, 1e-6) for _, _, y in pts)
            pts = [(r, x, max(y, ymin)) for r, x, y in pts]  # 1 - cos can round to 0
        for cat, (color, marker) in _STYLE.items():
            sel = [(x, y) for r, x, y in pts if _category(r["config"]) == cat]
            if sel:
                ax.scatter(*zip(*sel), s=42, color=color, marker=marker, zorder=3,
                           edgecolor="black", linewidth=0.5, label=cat)
        ci = [(x, y, r["top1_drop_ci_low"], r["top1_drop_ci_high"]) for r, x, y in pts
              if not sentence and r.get("top1_drop_ci_low") is not None
              and r.get("top1_drop_ci_high") is not None]
        if ci:  # the paired 95% interval of each drop (paired_top1_drop)
            ax.errorbar([c[0] for c in ci], [c[1] for c in ci],
                        yerr=[[max(c[1] - c[2], 0.0) for c in ci],
                              [max(c[3] - c[1], 0.0) for c in ci]],
                        fmt="none", ecolor="0.45", elinewidth=0.9, capsize=3, zorder=2.5,
                        label="paired 95% interval of the drop")
        front = pareto_front([(x, y) for _, x, y in pts])
        fx = [pts[i][1] for i in front]
        fy = [pts[i][2] for i in front]
        ax.plot(fx, fy, "-", color="0.25", lw=1.2, zorder=2, label="Pareto front")
        ax.scatter(fx, fy, s=130, facecolor="none", edgecolor="0.25", lw=1.0, zorder=2)
        ax.set_xscale("log")
        xs = [x for _, x, _ in pts]
        lo, hi = min(xs), max(xs)
        ax.set_xlim(lo / 1.12, hi * 1.25)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        if sentence:
            ax.set_yscale("log")
            ax.axhline(0.01, color="tab:purple", ls="--", lw=1,
                       label="target: cosine 0.99 (1 - cos = 0.01)")
            ax.set_ylabel("1 - mean cosine similarity to the float embeddings\n"
                          "(log scale; lower is better)")
            ys = [y for _, _, y in pts]
            ax.set_ylim(min(ys) / 2.5, max(max(ys), 0.01) * 2.5)
        else:
            ax.axhline(0.0, color="0.6", lw=0.8)
            ax.axhline(1.0, color="tab:purple", ls="--", lw=1, label="1 point below crossbar8")
            ax.set_ylabel(f"top-1 drop from the 8-bit crossbar ({REFERENCE})\n"
                          "(percentage points; lower is better)")
            ys = [y for _, _, y in pts] + [v for c in ci for v in c[2:]]
            lo_y, hi_y = min(min(ys), 0.0), max(max(ys), 1.0)
            if hi_y - lo_y > 8:  # a collapsed row would squash the interesting 0-2 points
                ax.set_yscale("symlog", linthresh=2.0, linscale=1.5)
                ticks = [t for t in (-5, -2, -1, 0, 1, 2, 5, 10, 20, 50, 100)
                         if lo_y - 0.5 <= t <= hi_y * 1.3 + 1]
                ax.yaxis.set_major_locator(FixedLocator(ticks))
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.yaxis.set_minor_locator(NullLocator())
                ax.set_ylim(lo_y - 0.6, hi_y * 1.35 + 0.5)
                ax.set_ylabel(f"top-1 drop from the 8-bit crossbar ({REFERENCE})\n"
                              "(percentage points, linear below 2, log above; lower is better)")
            else:
                span = max(hi_y - lo_y, 2.0)
                ax.set_ylim(lo_y - 0.08 * span, hi_y + 0.1 * span)
        ax.set_xlabel("reduction of memristor writes per pass against the unsorted baseline "
                      "(log scale; higher is better)")
        ax.grid(True, which="major", color="0.9", lw=0.6)
        leg = ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                        fontsize=8, framealpha=0.9)
        if title:
            ax.set_title(title, fontsize=10)
        fig.tight_layout()
        fig.canvas.draw()
        lb = leg.get_window_extent(fig.canvas.get_renderer())
        xy_px = [tuple(ax.transData.transform((x, y))) for _, x, y in pts]
        _place_labels(ax, xy_px, [r["name"] for r, _, _ in pts], fontsize=7.5,
                      obstacles=[(lb.x0, lb.y0, lb.x1, lb.y1)])
    return fig
