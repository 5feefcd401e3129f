#!/usr/bin/env python
"""GPU throughput: counting (program_layer on CUDA vs the CPU kernel) and crossbar inference vs
the float model, as ratios measured in one run. Needs a CUDA device; on a machine without one it
says so and exits with status 2.

  python benchmarks/bench_gpu.py [--model resnet50] [--batch 64]
"""
import argparse
import sys
import time

import timm
import torch

import crossbar_torch as xb
from crossbar_torch.programming import program_model


def timed(fn, sync, repeats=5):
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t) / repeats


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; run it on a GPU machine "
              "(build with FORCE_CUDA=1 or on a machine where torch sees the GPU)")
        sys.exit(2)
    sync = torch.cuda.synchronize
    cfg = xb.CrossbarConfig(stuck_slices=4, reprogram_fraction=0.25)
    model = timm.create_model(args.model).eval()
    x_cpu = xb.convert(model, cfg)
    t_cpu = timed(lambda: program_model(x_cpu), lambda: None, repeats=1)
    x_gpu = xb.convert(model.cuda(), cfg)
    t_gpu = timed(lambda: program_model(x_gpu), sync, repeats=3)
    print(f"counting {args.model}: CPU {t_cpu:.2f} s, CUDA {t_gpu:.3f} s per programming "
          f"(2 passes); ratio CPU/CUDA = {t_cpu / t_gpu:.1f}x")
    x = torch.randn(args.batch, 3, args.size, args.size, device="cuda")
    x_gpu.eval()
    with torch.inference_mode():
        tf = timed(lambda: model(x), sync)
        tc = timed(lambda: x_gpu(x), sync)
    print(f"inference {args.model} batch {args.batch}: float {args.batch / tf:.0f} img/s, "
          f"crossbar {args.batch / tc:.0f} img/s; ratio crossbar/float time = {tc / tf:.3f}x")


if __name__ == "__main__":
    main()
