#!/usr/bin/env python
"""Memory of convert + report on ViT-Base (timm ``vit_base_patch16_224``, random weights: no
download; memory and time hardly depend on the values) and its growth over a sweep.

Every case runs in a fresh subprocess, so each peak is that case's alone: the peak resident
set of the whole process (``getrusage(RUSAGE_SELF).ru_maxrss``: the float model, the converted
model and everything convert and the report keep alive) and the wall time of convert + report.

1. ``plain``: the default config.
2. ``comp``: value sort + chain placement + compensation at 2 stuck slices @ 0.25.
3. ``sweep``: four configurations converted and reported one after the other in one process
   (the last one is ``comp``), against ``comp`` alone: the ratio of the peaks (target <= 1.2).

Targets (issue 19): < 3 GB peak for 1 and 2.

  python benchmarks/bench_memory.py [--cases plain,comp,sweep] [--json PATH]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHAIN = {"sort": "value", "filter_order": "chain"}
COMP = {**CHAIN, "stuck_slices": 2, "reprogram_fraction": 0.25, "compensate": True}
CASES = {
    "plain": [{}],
    "comp": [COMP],
    # the sweep the issue describes: value+chain, then chain(+comp) at three stucking settings
    "sweep": [CHAIN, {**CHAIN, "stuck_slices": 1, "reprogram_fraction": 0.0},
              {**CHAIN, "stuck_slices": 2, "reprogram_fraction": 0.5}, COMP],
}


def run_case(configs: list) -> dict:
    """In this process: build the float model once, then convert + report each config."""
    sys.path.insert(0, ROOT)
    import timm
    import torch
    import crossbar_torch as xb
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    times, peaks = [], []
    for fields in configs:
        t = time.perf_counter()
        xmodel = xb.convert(model, xb.CrossbarConfig(**fields))
        report = xb.reprogram_report(xmodel)
        times.append(time.perf_counter() - t)
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
        writes = report.writes_per_pass
        del xmodel, report  # what a sweep loop does: the next config replaces this one
    return {"seconds": times, "peak_gib_after_each": peaks, "writes_per_pass": writes}


def subprocess_case(name: str) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {ROOT!r}); sys.path.insert(0, "
            f"{os.path.dirname(os.path.abspath(__file__))!r}); import bench_memory as b; "
            f"print(json.dumps(b.run_case(b.CASES[{name!r}])))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="plain,comp,sweep")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    results = {}
    for name in args.cases.split(","):
        r = results[name] = subprocess_case(name)
        print(f"{name:<6} peak {r['peak_gib_after_each'][-1]:.2f} GiB, time "
              f"{' + '.join(f'{s:.1f}' for s in r['seconds'])} s "
              f"(peak after each config: "
              f"{', '.join(f'{g:.2f}' for g in r['peak_gib_after_each'])} GiB)", flush=True)
    if "sweep" in results and "comp" in results:
        ratio = results["sweep"]["peak_gib_after_each"][-1] / \
            results["comp"]["peak_gib_after_each"][-1]
        results["sweep_ratio"] = ratio
        print(f"sweep of {len(CASES['sweep'])} configs / comp alone: peak ratio {ratio:.3f} "
              "(target <= 1.2)")
    if args.json:
        sys.path.insert(0, ROOT)
        from crossbar_torch.config import atomic_write_text
        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
