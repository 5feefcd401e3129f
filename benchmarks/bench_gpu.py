#!/usr/bin/env python
"""GPU figures, as ratios measured in one run (issue 19): eval throughput of the float model, the
ideal crossbar (default config) and the compensated crossbar (value sort + chain placement +
compensation at 2 slices @ 0.25) on resnet50 and vit_base_patch16_224 with random weights, and
the counting time (convert + one reprogram report) of ViT-Base on the GPU. Needs a CUDA device;
on a machine without one it says so in one line and exits with status 0 (nothing to measure).

  python benchmarks/bench_gpu.py [--models resnet50 vit_base_patch16_224] [--batch 256]
"""
import argparse
import time

import timm
import torch

import crossbar_torch as xb

IDEAL = xb.CrossbarConfig()
COMPENSATED = xb.CrossbarConfig(sort="value", filter_order="chain", stuck_slices=2,
                                reprogram_fraction=0.25, compensate=True)


def timed(fn, repeats=5):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats


def throughput(name: str, batch: int) -> None:
    model = timm.create_model(name, pretrained=False).eval().cuda()
    size = model.default_cfg.get("input_size", (3, 224, 224))
    x = torch.randn(batch, *size, device="cuda")
    rows = []
    with torch.inference_mode():
        t_float = timed(lambda: model(x))
    for label, cfg in (("ideal crossbar", IDEAL), ("compensated crossbar", COMPENSATED)):
        xm = xb.convert(model, cfg).eval()
        with torch.inference_mode():
            t = timed(lambda: xm(x))
        rows.append((label, t))
        del xm
        torch.cuda.empty_cache()
    print(f"{name} batch {batch}: float {batch / t_float:.0f} img/s")
    for label, t in rows:
        print(f"  {label}: {batch / t:.0f} img/s, time ratio to float {t / t_float:.3f}x")


def counting(name: str) -> None:
    model = timm.create_model(name, pretrained=False).eval().cuda()
    for label, cfg in (("ideal", IDEAL), ("compensated", COMPENSATED)):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        xm = xb.convert(model, cfg)
        rep = xb.reprogram_report(xm)
        torch.cuda.synchronize()
        t = time.perf_counter() - t0
        print(f"counting {name} ({label}): convert + report {t:.1f} s on CUDA, "
              f"{rep.reduction:.3f}x reduction, peak GPU memory "
              f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        del xm, rep
        torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "vit_base_patch16_224"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--counting-model", default="vit_base_patch16_224")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device on this machine; nothing measured")
        return
    print(f"device: {torch.cuda.get_device_name()}")
    for name in args.models:
        throughput(name, args.batch)
    counting(args.counting_model)


if __name__ == "__main__":
    main()
