#!/usr/bin/env python
"""Forward time of a converted model against the float model, and conversion time.

Prints ratios measured in the same process (these machines are noisy; no absolute seconds are
asserted anywhere). Targets (issue 2): forward ratio <= 1.15x on resnet50 (batch 8, 224 px, CPU);
conversion of resnet50 and vit_base_patch16_224 (random init) under 20 s each here.

  python benchmarks/bench_forward.py [--model resnet50] [--batch 8] [--repeats 5]
"""
import argparse
import time

import timm
import torch

import crossbar_torch as xb


def time_forward(model, x, repeats):
    with torch.inference_mode():
        model(x)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--convert-models", nargs="*", default=["resnet50", "vit_base_patch16_224"])
    args = p.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    xmodel = xb.convert(model, xb.CrossbarConfig()).eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    # interleave float / crossbar runs so drift hits both alike
    f, c = [], []
    for _ in range(3):
        f.append(time_forward(model, x, args.repeats))
        c.append(time_forward(xmodel, x, args.repeats))
    tf, tc = min(f), min(c)
    print(f"forward {args.model} batch {args.batch} @ {args.size}px: float {tf*1e3:.1f} ms, "
          f"crossbar {tc*1e3:.1f} ms, ratio crossbar/float = {tc / tf:.3f}x (target <= 1.15x)")
    for name in args.convert_models:
        m = timm.create_model(name).eval()
        t = time.perf_counter()
        xb.convert(m, xb.CrossbarConfig())
        dt = time.perf_counter() - t
        t = time.perf_counter()
        with torch.inference_mode():
            m(torch.randn(1, 3, 224, 224))
        ref = time.perf_counter() - t
        print(f"convert {name} ({sum(p.numel() for p in m.parameters()) / 1e6:.1f}M params): "
              f"{dt:.1f} s (target < 20 s) = {dt / ref:.0f}x one float forward at batch 1")


if __name__ == "__main__":
    main()
