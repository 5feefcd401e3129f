"""Plot the analog periphery study (configs/sweep_periphery.yaml) from scripts/frontier.py's CSV:
top-1 against ADC bits and against programming noise, unsorted against value-sorted.

  python scripts/plot_periphery.py docs/periphery/lite0.csv docs/periphery/lite0.png

Rows are read by their full configuration (the CSV's config column; else the config columns
it has: input_bits, adc_bits, prog_noise, sort, ...). The ideal 8-bit crossbar (the row
crossbar8, else the first row without stucking and with an ideal periphery) and the DAC-only
run are drawn as reference lines; rows with stucking, or with other analog fields (read noise,
drift, g_ratio) or both an ADC and noise, belong to neither panel and are left out (listed).
A CSV with no ADC or programming-noise row is refused; a panel without rows is not drawn.
The title names the model and weights the CSV records (its setup column, or the JSON beside
it), unless --title is given.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys


from crossbar_torch.apps.cli import (ArgumentParser, UsageError, check_output_file,  # noqa: E402
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


REFERENCE = "crossbar8"
NOTHING_TO_PLOT = ("no ADC or programming-noise row to plot (rows without stucking, with "
                   "adc_bits or prog_noise: configs/sweep_periphery.yaml's); "
                   "scripts/frontier.py draws other sweeps")
IDEAL = "ideal 8-bit crossbar"
# analog fields the two panels vary (rule 17 DAC, rule 18 ADC, rule 19 programming noise)
PLOTTED = ("input_bits", "input_bits_per_cycle", "input_range", "adc_bits", "adc_range",
           "adc_scope", "prog_noise")


def row_config(row):
    """The row's CrossbarConfig: its config column (JSON, every field), else the config
    columns the CSV has (the others at their defaults)."""
    import yaml

    from crossbar_torch.config import NULLABLE_FIELDS, CrossbarConfig
    from dataclasses import fields
    name = row.get("name")
    try:
        if row.get("config"):
            return CrossbarConfig.from_dict(json.loads(row["config"]))
        known = {f.name for f in fields(CrossbarConfig)}
        d = {}
        for k in known & set(row):
            v = row[k]
            if v in ("", None):
                if k in NULLABLE_FIELDS:
                    d[k] = None
                continue
            d[k] = yaml.safe_load(v)
        return CrossbarConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise UsageError(f"row {name!r}: its configuration cannot be read ({e})") from None


def series(rows):
    """{"adc": {sort: [(bits, top1)]}, "noise": {sort: [(pct, top1)]}, "ref": {label: top1},
    "skipped": [row names]}."""
    from crossbar_torch.config import ANALOG_FIELDS, CrossbarConfig
    ideal = CrossbarConfig()
    out = {"adc": {}, "noise": {}, "ref": {}, "skipped": []}
    for r in rows:
        top1 = _num(r, "top1")
        if top1 is None:
            continue
        cfg = row_config(r)
        other = [k for k in ANALOG_FIELDS
                 if k not in PLOTTED and getattr(cfg, k) != getattr(ideal, k)]
        if cfg.stucking or other or (cfg.adc_bits is not None and cfg.prog_noise):
            out["skipped"].append(r.get("name"))
            continue
        label = {"none": "no sort", "value": "value sort + chain"}.get(cfg.sort,
                                                                      f"{cfg.sort} sort")
        if cfg.adc_bits is not None:
            out["adc"].setdefault(label, []).append((float(cfg.adc_bits), top1))
        elif cfg.prog_noise:
            out["noise"].setdefault(label, []).append((100 * cfg.prog_noise, top1))
        elif cfg.input_bits is None:  # ideal: the reference row, else the first such row
            if r.get("name") == REFERENCE or IDEAL not in out["ref"]:
                out["ref"][IDEAL] = top1
        else:
            out["ref"].setdefault(f"{cfg.input_bits}-bit DAC, no ADC", top1)
    if IDEAL in out["ref"]:  # the ideal line first
        out["ref"] = {IDEAL: out["ref"][IDEAL],
                      **{k: v for k, v in out["ref"].items() if k != IDEAL}}
    for kind in ("adc", "noise"):
        for k in out[kind]:
            out[kind][k].sort()
    return out


def default_title(csv_path: str, rows) -> str:
    """'<model> (<weights>) on crossbars with an analog periphery', the model and weights
    from the CSV's setup column or the JSON frontier.py wrote beside it."""
    meta = {}
    try:
        if rows and rows[0].get("setup"):
            meta = json.loads(rows[0]["setup"])
        else:
            with open(os.path.splitext(csv_path)[0] + ".json", encoding="utf-8") as f:
                meta = json.load(f)
    except (OSError, ValueError):
        meta = {}
    if not isinstance(meta, dict) or not meta.get("model"):
        return "Crossbars with an analog periphery"
    weights = f" ({meta['weights']})" if meta.get("weights") else ""
    return f"{meta['model']}{weights} on crossbars with an analog periphery"


def draw(rows, title=""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = series(rows)
    images = rows[0].get("images", "")
    panels = [(kind, xlabel, t) for kind, xlabel, t in (
        ("adc", "ADC bits per column partial sum",
         "8-bit bit-serial DAC + ADC (calibrated range per slice)"),
        ("noise", "programming noise (relative std of G, %)",
         "8-bit DAC, programming noise, no ADC")) if s[kind]]
    if not panels:
        raise UsageError(NOTHING_TO_PLOT)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.6), sharey=True,
                             squeeze=False)
    axes = axes[0]
    styles = {"no sort": dict(color="tab:blue", marker="o"),
              "value sort + chain": dict(color="tab:orange", marker="s")}
    for ax, (kind, xlabel, panel_title) in zip(axes, panels):
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
        ax.set_title(panel_title, fontsize=10)
    axes[0].set_ylabel(f"top-1 (%, {images} ImageNet images)" if images else "top-1 (%)")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", help="scripts/frontier.py CSV of configs/sweep_periphery.yaml")
    p.add_argument("png", help="output image (.png, .svg, .pdf)")
    p.add_argument("--title", help="default: '<model> (<weights>) on crossbars with an analog "
                                   "periphery', from what the CSV (or the JSON beside it) "
                                   "records")
    args = p.parse_args(argv)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    check_output_file(args.png, "png",  # the extension picks the format: one matplotlib writes
                      tuple(sorted(FigureCanvasAgg.get_supported_filetypes())))
    rows = read_rows(args.csv)
    try:
        s = series(rows)
    except UsageError as e:
        raise UsageError(f"{args.csv}: {e}") from None
    if not s["adc"] and not s["noise"]:
        raise UsageError(f"{args.csv}: {NOTHING_TO_PLOT}")
    if s["skipped"]:
        print(f"left out {len(s['skipped'])} row(s) of neither panel (stucking, other analog "
              f"fields, or ADC and noise together): {', '.join(map(str, s['skipped']))}",
              file=sys.stderr)
    try:
        fig = draw(rows, default_title(args.csv, rows) if args.title is None else args.title)
    except UsageError as e:
        raise UsageError(f"{args.csv}: {e}") from None
    import matplotlib.pyplot as plt
    fmt = os.path.splitext(args.png)[1].lstrip(".").lower() or "png"
    try:
        atomic_write(args.png, lambda f: fig.savefig(f, format=fmt, dpi=120,
                                                     bbox_inches="tight"), binary=True)
    finally:
        plt.close(fig)
    print(f"wrote {args.png}")


def entry_point():
    """Console entry point (pyproject.toml [project.scripts])."""
    run_main(main)


if __name__ == "__main__":
    entry_point()
