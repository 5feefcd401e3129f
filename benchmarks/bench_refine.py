#!/usr/bin/env python
"""Rule 24's refinement sweeps against rule 23 alone, layer by layer, on all-mpnet-base-v2.

    python benchmarks/bench_refine.py [--config YAML] [--layers GLOB ...] [--sweeps N ...]
    python benchmarks/bench_refine.py --product-only

Converts the model with ``--config`` (default ``configs/mpnet_allocated_17x.yaml``: rule 23
penalties, nothing stuck), calibrates it on the first 256 sentences of the packaged calibration
corpus (as the scripts do), and for each layer matching ``--layers`` (default: block 5's
``attn.q``, ``intermediate.dense`` and ``output.dense``) prints, from the same moments:

* rule 23 at the layer's penalty ``w``, at ``1.5 w`` and at ``2 w`` (the trade-off rule 23
  alone makes when it is asked for fewer writes);
* rule 23 at ``w`` followed by each ``--sweeps`` count of rule 24 (default 1, 4, 8);

each with its writes (the cells that differ from the predecessor filter's at the same sorted
position: rule 23's count; the programming's rule-8 count adds the first block's writes) and its
in-sample relative output error ``tr(E H E^T) / tr(W H W^T)``, and the time of the sweeps over
the time of rule 23's op in the same process (these machines are noisy: a ratio, not seconds).

Then (alone with ``--product-only``, which needs no model) the op on a synthetic 768 x 3072
layer where nothing moves (its time is the running product ``g = (q - t) Hs``, rule 24's exact
order, and one sweep of choices) against a float64 BLAS product of the same shape (fused,
blocked in any order: the floor for this many multiply-adds).
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_LAYERS = ("*layer.5.attention.attn.q", "*layer.5.intermediate.dense",
                  "*layer.5.output.dense")


def predecessor_writes(q, index, pred, table, qmax):
    """Cells of each filter that differ from its predecessor's at the same sorted position."""
    cells = table[torch.gather(q.long(), 1, index) + qmax]
    has = pred >= 0
    return int((cells[has] != cells[pred[has]]).sum())


def relative_error(q, t, scale, h):
    d = (q.double() - t) * scale[:, None]
    w = t * scale[:, None]
    return float(((d @ h) * d).sum() / ((w @ h) * w).sum())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "mpnet_allocated_17x.yaml"),
                    help="a rule-23 config that sticks nothing (default: the 17x policy)")
    ap.add_argument("--layers", nargs="+", default=list(DEFAULT_LAYERS), metavar="GLOB",
                    help="glob patterns on the converted model's layer names")
    ap.add_argument("--sweeps", nargs="+", type=int, default=[1, 4, 8], metavar="N")
    ap.add_argument("--product-only", action="store_true",
                    help="only the running product against a BLAS product (no model)")
    args = ap.parse_args(argv)
    if args.product_only:
        return product_ratio()
    if any(not 1 <= n <= 100 for n in args.sweeps):
        print(f"error: --sweeps must be in [1, 100], got {args.sweeps}", file=sys.stderr)
        return 2
    import crossbar_torch as xb
    from crossbar_torch import ops
    from crossbar_torch.apps.cli import config_from_file
    from crossbar_torch.apps.frontier import feedback_sentences
    from crossbar_torch.apps.models.mpnet import load_mpnet
    from crossbar_torch.errors import UserInputError
    from crossbar_torch.feedback import feedback_factor, placement_predecessors, scaled_moment
    try:  # a missing or broken file, a bad field; then the parts not installed
        cfg = config_from_file(args.config)
        st = load_mpnet()
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = xb.convert(st, cfg, inplace=True)
    sentences = feedback_sentences(None, "corpus")
    xb.calibrate(model, run=lambda m: m.encode(sentences, batch_size=64))
    layers = [(n, l) for n, l in xb.crossbar_layers(model)
              if any(fnmatch.fnmatchcase(n, g) for g in args.layers)]
    if not layers:
        print(f"error: --layers {args.layers} match no layer of the model", file=sys.stderr)
        return 2
    empty_b, empty_u = torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.uint8)
    for name, layer in layers:
        lcfg = cfg.for_layer(name)
        if lcfg.stucking or lcfg.write_penalty <= 0:
            print(f"{name}: skipped (rule 24 needs nothing stuck; this compares it with rule "
                  "23, which needs a write penalty)")
            continue
        qmax = 2 ** (lcfg.weight_bits - 1) - 1
        table = ops.encode(torch.arange(-qmax, qmax + 1, dtype=torch.int32)[None].contiguous(),
                           lcfg.weight_bits, lcfg.bits_per_cell, lcfg.encoding_id)[0].long()
        scale = layer.scale.detach().float().cpu()
        t = (layer.matrix_weight().detach().float().cpu() / scale[:, None]).double()
        h = layer.input_moment.detach().double().cpu()[0]
        u = feedback_factor(layer.input_moment, lcfg.feedback_damp)
        hs = scaled_moment(layer.input_moment, lcfg.feedback_damp)
        pred = placement_predecessors(layer.filter_index, t.shape[0], lcfg)
        index = layer.long_sort_index().cpu()
        w = lcfg.write_penalty

        def rule23(penalty):
            return ops.feedback_quantize(t, u, empty_b, empty_u, lcfg.weight_bits,
                                         lcfg.bits_per_cell, lcfg.encoding_id, 0, pred, index,
                                         penalty)

        def row(label, q, extra=""):
            print(f"  {label:24s} writes {predecessor_writes(q, index, pred, table, qmax):>10,d}"
                  f"  relative output error {relative_error(q, t, scale, h):.3e}{extra}")

        print(f"{name} {tuple(t.shape)}, write_penalty {w:g}, feedback_damp "
              f"{lcfg.feedback_damp:g}")
        start = time.perf_counter()
        q = rule23(w)
        base = time.perf_counter() - start
        row(f"rule 23, w = {w:g}", q)
        for f in (1.5, 2.0):
            row(f"rule 23, w = {f * w:g}", rule23(f * w))
        for n in args.sweeps:
            start = time.perf_counter()
            q2 = ops.feedback_refine(t, hs, q, pred, index, lcfg.weight_bits, lcfg.bits_per_cell,
                                     lcfg.encoding_id, w, n)
            took = time.perf_counter() - start
            row(f"w = {w:g} + {n} sweep(s)", q2, f"  (time {took / base:.2f}x rule 23's op)")
    return product_ratio()


def product_ratio(n: int = 768, k: int = 3072, repeats: int = 3) -> int:
    """The op where no weight moves (targets on their integers, no penalty: every move costs
    more than it saves), against ``a @ Hs`` in float64 BLAS; the best of ``repeats`` each."""
    from crossbar_torch import ops
    g = torch.Generator().manual_seed(0)
    x = torch.randn(k, k, generator=g, dtype=torch.float64) / k ** 0.5
    hs = (x @ x.T)[None].contiguous()
    q = torch.randint(-100, 100, (n, k), generator=g, dtype=torch.int32)
    t = q.double()
    pred = torch.full((n,), -1, dtype=torch.int64)
    index = torch.arange(k).expand(n, k).contiguous()
    a = torch.randn(n, k, generator=g, dtype=torch.float64)
    ours = blas = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        ops.feedback_refine(t, hs, q, pred, index, 8, 1, 0, 0.0, 1)
        ours = min(ours, time.perf_counter() - start)
        start = time.perf_counter()
        a @ hs[0]
        blas = min(blas, time.perf_counter() - start)
    print(f"running product + one idle sweep, {n} x {k} x {k}: {ours:.2f} s, "
          f"{ours / blas:.1f}x a float64 BLAS product of that shape ({blas:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
