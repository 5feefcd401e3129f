"""Time program_layer: compiled kernel (torch.ops.crossbar_torch) vs the plain-PyTorch reference,
in one process, on synthetic layers; prints reference / C++ per layer and overall.

    python benchmarks/bench_counting.py [--threads N] [--reps R]

Without --threads it runs twice: on one thread and on torch's default thread count (the
multi-threaded numbers suffer on an oversubscribed machine; the one-thread ratio is the stable
figure).
"""
from __future__ import annotations

import argparse

import torch

import crossbar_torch.ops as ops
from crossbar_torch.ops import reference as ref
from bench_report import best_time  # the same best-of-N timer (this folder is on sys.path)

# (name, out, K): one big layer plus a few EfficientNet-Lite0-sized ones (conv weight matrices).
LAYERS = [
    ("synthetic 1280x1152", 1280, 1152),
    ("effnet-lite0 conv_head 1280x320", 1280, 320),
    ("effnet-lite0 blocks.5 pw 1152x192", 1152, 192),
    ("effnet-lite0 blocks.3 pw 480x80", 480, 80),
    ("effnet-lite0 blocks.6 pw 320x1152", 320, 1152),
    ("effnet-lite0 blocks.4 dw 672x25", 672, 25),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--cols", type=int, default=128)
    ap.add_argument("--weight-bits", type=int, default=8)
    ap.add_argument("--bits-per-cell", type=int, default=1)
    ap.add_argument("--pool", type=int, default=1)
    args = ap.parse_args()
    default_threads = torch.get_num_threads()
    for threads in ([args.threads] if args.threads else sorted({1, default_threads})):
        torch.set_num_threads(threads)
        bench(args)
        print()


def bench(args):
    B, b, e = args.weight_bits, args.bits_per_cell, ref.DIFFERENTIAL
    c = ref.cells_for(B, b, e)
    rows, cols, pool = args.rows, args.cols, args.pool
    words = ref.words_for(cols)
    g = torch.Generator().manual_seed(0)
    print(f"program_layer, rows={rows} cols={cols} B={B} bits_per_cell={b} c={c} pool={pool} "
          f"threads={torch.get_num_threads()}")
    print(f"{'layer':36s} {'tiles':>6s} {'reference s':>12s} {'C++ s':>10s} {'ratio':>8s}")
    tot_ref = tot_cpp = 0.0
    for name, out, K in LAYERS:
        w = torch.randn(out, K, generator=g)
        q, s = ref.quantize(w, B, True)
        index = ref.sort_index(q.abs())
        cells = ref.encode(torch.gather(q, 1, index), B, b, e)
        stuck = ref.pack_bits(torch.rand(pool, rows, cols, generator=g) < 0.3)

        def fresh():
            return (torch.zeros(pool, rows, b, words, dtype=torch.int64),
                    torch.zeros(pool, rows, words, dtype=torch.int64), stuck,
                    torch.zeros(pool, rows, cols, dtype=torch.int32))

        empty = torch.zeros(0, dtype=torch.int64)
        head = (empty, empty, torch.zeros(0, dtype=torch.uint8))
        call = (0, rows, cols, B, b, e, True, True, 0, 0)
        st_r, st_c = fresh(), fresh()
        res_r = ref.program_layer(cells, *head, *st_r, *call)
        res_c = ops.program_layer(cells, *head, *st_c, *call)
        assert all(torch.equal(x, y) for x, y in zip(res_r, res_c)), name
        assert all(torch.equal(x, y) for x, y in zip(st_r, st_c)), name
        t_ref = best_time(lambda: ref.program_layer(cells, *head, *fresh(), *call),
                          max(1, args.reps // 2))[0]
        t_cpp = best_time(lambda: ops.program_layer(cells, *head, *fresh(), *call), args.reps)[0]
        tiles = -(-K // rows) * -(-out // (cols // c))
        tot_ref += t_ref
        tot_cpp += t_cpp
        print(f"{name:36s} {tiles:6d} {t_ref:12.4f} {t_cpp:10.4f} {t_ref / t_cpp:8.1f}x")
    print(f"{'total':36s} {'':6s} {tot_ref:12.4f} {tot_cpp:10.4f} {tot_ref / tot_cpp:8.1f}x")


if __name__ == "__main__":
    main()
