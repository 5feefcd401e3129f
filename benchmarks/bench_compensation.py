"""Time program_layer with rule-13 compensation against the same call without it, in one process.

    python benchmarks/bench_compensation.py [--threads N] [--reps R] [--layers lite0|vit|all]

Each layer is programmed on one crossbar (pool 1) whose stuck mask follows rule 7
(programming.stuck_mask), stuck_value "initial", for every (stuck slices, p) setting. The timed
call is the second pass (steady state, rule 8: every stuck cell is held), run on a copy of the
state the first pass left; the plain call uses the same mask with compensate_slices=0. Prints
compensated / plain per layer and the totals; the issue's target is <= 2x. Without --threads it
runs on one thread and on torch's default count (the one-thread ratio is the stable figure on a
shared machine).
"""
from __future__ import annotations

import argparse

import torch

import crossbar_torch.ops as ops
from crossbar_torch.config import CrossbarConfig
from crossbar_torch.ops import reference as ref
from crossbar_torch.programming import stuck_mask
from bench_report import best_time  # the same best-of-N timer (this folder is on sys.path)

# (name, out, K): weight matrices of EfficientNet-Lite0 convs and of ViT-Base's Linear layers.
LITE0 = [
    ("lite0 conv_head 1280x320", 1280, 320),
    ("lite0 blocks.5 pw 1152x192", 1152, 192),
    ("lite0 blocks.3 pw 480x80", 480, 80),
    ("lite0 blocks.6 pw 320x1152", 320, 1152),
    ("lite0 blocks.4 dw 672x25", 672, 25),
]
VIT = [
    ("vit qkv/proj 768x768", 768, 768),
    ("vit fc1 3072x768", 3072, 768),
    ("vit fc2 768x3072", 768, 3072),
]
SETTINGS = [(1, 0.0), (1, 0.25), (2, 0.0), (2, 0.25)]  # (stuck_slices, reprogram_fraction p)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", choices=("lite0", "vit", "all"), default="all")
    args = ap.parse_args()
    layers = {"lite0": LITE0, "vit": VIT, "all": LITE0 + VIT}[args.layers]
    for threads in ([args.threads] if args.threads else sorted({1, torch.get_num_threads()})):
        torch.set_num_threads(threads)
        bench(layers, args.reps)
        print()


def bench(layers, reps):
    g = torch.Generator().manual_seed(0)
    mats = {name: torch.randn(out, K, generator=g) for name, out, K in layers}
    print(f"program_layer second pass, rows=128 cols=128 B=8 differential bits_per_cell=1, pool 1, "
          f"stuck_value initial, threads={torch.get_num_threads()}")
    print(f"{'layer':30s} {'L':>2s} {'p':>5s} {'plain s':>9s} {'comp s':>9s} {'ratio':>7s}")
    totals = {}
    for L, p in SETTINGS:
        cfg = CrossbarConfig(rows=128, cols=128, weight_bits=8, bits_per_cell=1,
                             encoding="differential", stuck_slices=L, reprogram_fraction=p,
                             stuck_value="initial", compensate=True)
        B, b, e = 8, 1, ref.DIFFERENTIAL
        words = ref.words_for(cfg.cols)
        stuck = ref.pack_bits(stuck_mask(cfg, 0)[None])
        empty = torch.zeros(0, dtype=torch.int64)
        head = (empty, empty, torch.zeros(0, dtype=torch.uint8))
        t_plain = t_comp = 0.0
        for name, out, K in layers:
            q, _ = ref.quantize(mats[name], B, True)
            cells = ref.encode(torch.gather(q, 1, ref.sort_index(q.abs())), B, b, e)
            times = []
            for comp in (0, L):
                call = (0, cfg.rows, cfg.cols, B, b, e, True, True, comp, 0)
                st = (torch.zeros(1, cfg.rows, b, words, dtype=torch.int64),
                      torch.zeros(1, cfg.rows, words, dtype=torch.int64), stuck,
                      torch.zeros(1, cfg.rows, cfg.cols, dtype=torch.int32))
                ops.program_layer(cells, *head, *st, *call)  # first pass: initial programming

                def second_pass():
                    ops.program_layer(cells, *head, st[0].clone(), st[1].clone(), st[2],
                                      st[3].clone(), *call)
                times.append(best_time(second_pass, reps)[0])
            t_plain += times[0]
            t_comp += times[1]
            print(f"{name:30s} {L:2d} {p:5.2f} {times[0]:9.4f} {times[1]:9.4f} "
                  f"{times[1] / times[0]:6.2f}x")
        totals[(L, p)] = (t_plain, t_comp)
    for (L, p), (tp, tc) in totals.items():
        print(f"{'total':30s} {L:2d} {p:5.2f} {tp:9.4f} {tc:9.4f} {tc / tp:6.2f}x")
    tp = sum(v[0] for v in totals.values())
    tc = sum(v[1] for v in totals.values())
    print(f"{'total, every setting':30s} {'':2s} {'':5s} {tp:9.4f} {tc:9.4f} {tc / tp:6.2f}x")


if __name__ == "__main__":
    main()
