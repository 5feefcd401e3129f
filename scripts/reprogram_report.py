#!/usr/bin/env python
"""Memristor writes of a model on crossbars: configuration against its unsorted baseline.

Examples:
  python scripts/reprogram_report.py --model tf_efficientnet_lite0 --config configs/paper.yaml
  python scripts/reprogram_report.py --model minilm --sweep configs/sweep_paper.yaml --csv out.csv
  python scripts/reprogram_report.py --model resnet50 --pretrained --set stuck_slices=2 --json r.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import crossbar_torch as xb  # noqa: E402
from crossbar_torch.cli import (add_config_args, add_model_args, config_from_args,  # noqa: E402
                                describe_source, model_from_args)
from crossbar_torch.config import atomic_write_text  # noqa: E402


def load_sweep(paths, overrides):
    """Runs of a sweep: each path is a config YAML, or a sweep YAML {base: {...}, runs: [...]}."""
    import yaml
    runs = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"sweep file not found: {path}")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if isinstance(data, dict) and "runs" in data:
            base = data.get("base", {})
            for i, run in enumerate(data["runs"]):
                run = dict(run)
                name = str(run.pop("name", f"run{i}"))
                cfg = xb.CrossbarConfig.from_dict({**base, **run}).with_overrides(overrides)
                runs.append((name, cfg))
        else:
            name = os.path.splitext(os.path.basename(path))[0]
            runs.append((name, xb.load_config(path, overrides)))
    return runs


def sweep_table(rows) -> str:
    head = (f"{'run':<28}{'writes/pass':>14}{'baseline':>14}{'reduction':>11}"
            f"{'initial':>14}{'rows/pass':>12}{'max/cell':>10}")
    lines = [head, "-" * len(head)]
    for name, d in rows:
        red = d["reduction"]
        red = f"{red:.3f}x" if isinstance(red, float) else str(red)
        lines.append(f"{name[:28]:<28}{d['writes_per_pass']:>14,}"
                     f"{d['baseline_writes_per_pass']:>14,}{red:>11}{d['initial_writes']:>14,}"
                     f"{d['rows_programmed_per_pass']:>12,}{d['max_cell_writes_per_pass']:>10,}")
    return "\n".join(lines)


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(f"--plot needs matplotlib (pip install matplotlib): {e}")
    import numpy as np
    fig, ax = plt.subplots(figsize=(8, 4.5))
    first = rows[0][1]
    slices = list(first["per_slice"])
    x = np.arange(len(slices))
    series = [("baseline", [first["baseline_per_slice"][s] for s in slices])]
    series += [(name, [d["per_slice"].get(s, 0) for s in slices]) for name, d in rows]
    width = 0.8 / len(series)
    for i, (name, vals) in enumerate(series):
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=name)
    ax.set_xticks(x, [f"slice {s}" for s in slices])
    ax.set_ylabel("writes per pass")
    ax.set_title("Memristor writes per pass by bit slice (0 = least significant)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_config_args(p)
    p.add_argument("--sweep", nargs="+", metavar="YAML",
                   help="config YAMLs and/or sweep YAMLs ({base, runs}); one table row each")
    p.add_argument("--include", action="append", help="glob of layer names to convert")
    p.add_argument("--exclude", action="append", help="glob of layer names to leave alone")
    p.add_argument("--json", metavar="PATH", help="write the report(s) as JSON (atomic)")
    p.add_argument("--csv", metavar="PATH", help="write per-layer CSV (sweep: one row per run)")
    p.add_argument("--plot", metavar="PNG", help="bar chart of writes per slice (matplotlib)")
    p.add_argument("--layers", action="store_true", help="print the per-layer table too")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    try:  # configuration and input errors: one clear line, exit status 2
        runs = (load_sweep(args.sweep, args.overrides) if args.sweep
                else [(os.path.splitext(os.path.basename(args.config))[0] if args.config
                       else "default config", config_from_args(args))])
        model = model_from_args(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        p.error(str(e))
    print(f"model {args.model} ({describe_source(args)})", file=sys.stderr)
    rows, reports = [], []
    from tqdm.auto import tqdm
    for name, cfg in tqdm(runs, desc="sweep", disable=args.quiet or len(runs) == 1):
        xmodel = xb.convert(model, cfg, include=args.include, exclude=args.exclude,
                            program=False, progress=not args.quiet)
        rep = xb.reprogram_report(xmodel, progress=not args.quiet, model_name=args.model)
        reports.append(rep)
        rows.append((name, rep.to_dict()))
        del xmodel
    if len(runs) == 1:
        rep = reports[0]
        text = str(rep)
        if not args.layers:
            text = text.split("\n\n  layer")[0]
        print(text)
        if args.json:
            rep.to_json(args.json)
        if args.csv:
            rep.to_csv(args.csv)
    else:
        print(f"model {args.model}: {rows[0][1]['layer_count']} layers, "
              f"{rows[0][1]['weights']:,} weights")
        print(sweep_table(rows))
        if args.json:
            atomic_write_text(args.json, json.dumps({name: d for name, d in rows}, indent=2) + "\n")
        if args.csv:
            import csv
            import io
            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(["run", "writes_per_pass", "baseline_writes_per_pass", "reduction",
                        "initial_writes", "rows_programmed_per_pass",
                        "max_cell_writes_per_pass", "config"])
            for name, d in rows:
                w.writerow([name, d["writes_per_pass"], d["baseline_writes_per_pass"],
                            d["reduction"], d["initial_writes"], d["rows_programmed_per_pass"],
                            d["max_cell_writes_per_pass"], json.dumps(d["config"])])
            atomic_write_text(args.csv, buf.getvalue())
    if args.plot:
        plot(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
