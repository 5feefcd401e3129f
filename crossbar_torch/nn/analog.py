"""The analog periphery of a crossbar layer: DAC, ADC, conductance noise and drift
(docs/semantics.md rules 17 to 20).

A crossbar layer whose config is not ideal (``config.analog``) computes its output here instead
of with the cached GEMM of rule 9:

* ``conductances``: each cell's conductance in level units (rule 19), from the held levels,
  the programming error of its last write, its drift and a fresh read-noise draw;
* ``layer_output``: the layer's output: without an ADC one float64 op over the quantized
  inputs (the shift-and-add is then linear); with an ADC per bit-sliced column the fused op
  ``analog_matmul`` on the input rows (im2col for a convolution); with ``adc_scope="weight"``
  one GEMM or convolution per 128-row section (``_weight_scope``);
* calibration mode (``calibrating``): the forward records the input and ADC ranges (rule 20;
  ``crossbar_torch.nn.calibration.calibrate`` runs it).

The layer owns its periphery state as buffers (``input_range``, ``adc_range``, ``prog_eps``,
``drift_nu``); the functions here read them from the layer passed in. This module imports
nothing from the layers, so the layers import it and there is no import circle.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from .. import encoding, ops
from ..config import CrossbarConfig
from ..errors import InvalidTensorError
from ..quantization import adc_step

T0_SECONDS = 1.0


# ---- cell decoding weights (rule 18) -----------------------------------------------------------

def cell_weights(cfg: CrossbarConfig) -> tuple:
    """(w_i (c,) float64, encoding offset): q = sum_i w_i * level_i - offset (rule 3 / 18)."""
    return encoding.cell_weights(cfg.weight_bits, cfg.bits_per_cell, cfg.encoding)


def cell_slices(cfg: CrossbarConfig) -> list:
    """Slice of each of a weight's c cells."""
    return encoding.cell_slices(cfg.weight_bits, cfg.bits_per_cell, cfg.encoding)


# ---- conductances (rule 19) ------------------------------------------------------------------

def _seed(*parts) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> 1)


def conductances(layer, read: bool = True, cells: torch.Tensor | None = None) -> torch.Tensor:
    """float32 (out, c, K): the conductance of every cell in level units, as the crossbar reads
    it now (rule 19). ``read`` draws a fresh read noise (one per forward). ``cells``: levels
    to read instead of the held ones (train mode: what programming the latent weight gives)."""
    cfg = layer.config
    g = (layer.held_cells() if cells is None else cells).to(torch.float32) + cfg.g0
    if cfg.prog_noise and layer.prog_eps.numel():
        g = g * (1 + cfg.prog_noise * layer.prog_eps)
    if layer.drift_nu.numel() and cfg.t_inference > T0_SECONDS:
        g = g * torch.pow(torch.tensor(cfg.t_inference / T0_SECONDS), -layer.drift_nu)
    if read and cfg.read_noise:
        eps = _read_noise_draw(layer, tuple(g.shape)).to(g.device)
        g = g * (1 + cfg.read_noise * eps)
    return torch.clamp(g, min=0).permute(0, 2, 1).contiguous()


@torch.compiler.disable
def _read_noise_draw(layer, shape: tuple) -> torch.Tensor:
    """Rule 19: the layer's next read-noise draw (standard normal, float32, CPU), keyed by
    (seed, layer, forward count). Run eagerly under ``torch.compile``: the seed is numpy
    arithmetic (uint64), which a traced graph cannot hold, and the count is python state that
    must advance on every call."""
    count = layer._forward_count
    layer._forward_count += 1
    gen = torch.Generator().manual_seed(_seed(layer.config.seed, 3, layer.layer_number, count))
    return torch.randn(shape, generator=gen, dtype=torch.float32)


# ---- the layer's output (rules 17 and 18) --------------------------------------------------------

class CalibrationNeeded(RuntimeError):
    pass


def input_scale(layer, x: torch.Tensor) -> float:
    """Rule 17: s_x = r / (2**I - 1) (1.0 with an ideal DAC)."""
    cfg = layer.config
    if cfg.input_bits is None:
        return 1.0
    r = input_full_scale(layer)
    return float(torch.tensor(r, dtype=torch.float32) / (2 ** cfg.input_bits - 1))


def input_full_scale(layer) -> float:
    cfg = layer.config
    if cfg.input_range is not None:
        return float(cfg.input_range)
    if not layer.input_range.numel():
        raise CalibrationNeeded(
            f"crossbar layer {layer.layer_name!r} has no calibrated input range: call "
            "crossbar_torch.calibrate(model, batch) or set input_range in the config")
    return float(layer.input_range[0])


def adc_steps(layer, pmax: torch.Tensor | None = None) -> torch.Tensor:
    """Rule 18: the ADC step of each cell (c,) float64, from the full or calibrated range of
    its slice (``pmax``: ranges being calibrated now, per cell)."""
    cfg = layer.config
    signed = cfg.adc_scope == "weight"
    c = 1 if signed else cfg.cells_per_weight
    if cfg.adc_bits is None:
        return torch.ones(c, dtype=torch.float64)
    if cfg.adc_range == "full":
        if signed:
            r = cfg.rows * cfg.qmax * (2 ** cfg.input_bits - 1)
        else:
            top = (2 ** cfg.input_bits_per_cycle - 1 if cfg.input_bits is not None
                   else input_full_scale(layer))
            r = cfg.rows * (2 ** cfg.bits_per_cell - 1 + cfg.g0) * top
        return torch.full((c,), adc_step(r, cfg.adc_bits, signed), dtype=torch.float64)
    if pmax is not None:
        ranges = slice_ranges(layer, pmax)
    elif layer.adc_range.numel():
        ranges = layer.adc_range.tolist()
    else:
        raise CalibrationNeeded(
            f"crossbar layer {layer.layer_name!r} has no calibrated ADC range: call "
            "crossbar_torch.calibrate(model, batch) or set adc_range='full'")
    sl = [0] if signed else cell_slices(cfg)
    return torch.tensor([adc_step(ranges[s], cfg.adc_bits, signed) for s in sl],
                        dtype=torch.float64)


def slice_ranges(layer, pmax: torch.Tensor) -> list:
    """Calibrated ADC range per slice: the largest partial sum of its cells (both arrays)."""
    cfg = layer.config
    if cfg.adc_scope == "weight":
        return [float(pmax.max())]
    out = [0.0] * cfg.slices
    for i, s in enumerate(cell_slices(cfg)):
        out[s] = max(out[s], float(pmax[i]))
    return out


def _quantize(layer, x: torch.Tensor, s_x: float) -> torch.Tensor:
    """Rule 17: xq in float32 arithmetic, returned as float64 (the raw x with an ideal DAC)."""
    bits = layer.config.input_bits
    x = x.to(torch.float32)
    if bits is None:
        return x.to(torch.float64)
    top = 2 ** bits - 1
    return torch.clamp(torch.round(x / torch.tensor(s_x, dtype=torch.float32)), -top,
                       top).to(torch.float64)


def _cells_and_weights(layer, cells):
    """(g (out, c, K) float32, w_i (c,), encoding offset, g0) for the layer's scope."""
    cfg = layer.config
    if cfg.adc_scope == "weight":
        held = layer.held_cells() if cells is None else cells
        g = layer.held_op("decode", ops.decode, held, cfg.weight_bits, cfg.bits_per_cell,
                          cfg.encoding_id).to(
            torch.float32)[:, None, :]                                  # q_eff, sorted order
        return g, torch.ones(1, dtype=torch.float64), 0.0, 0.0
    w_cells, offset = cell_weights(cfg)
    return conductances(layer, cells=cells), w_cells, offset, cfg.g0


def linear_weight(layer, cells: torch.Tensor | None = None) -> torch.Tensor:
    """Rule 20's linear path: W_g[o, k] = sum_i w_i (g - g0) - offset in float64, original
    order, shaped like the layer's weight. Kept by the layer (``layer.cached``: stale once the
    cells, scale, sort index, programming errors or drift are replaced or edited in place) when
    there is no read noise (which draws anew each forward)."""
    if cells is None and not layer.config.read_noise and not torch.compiler.is_compiling():
        return layer.cached("_linear_cache", lambda: _linear_weight(layer, None))
    return _linear_weight(layer, cells)


def _linear_weight(layer, cells):
    g, w_cells, offset, g0 = _cells_and_weights(layer, cells)
    wg = ((g.to(torch.float64) - g0) * w_cells.to(g.device)[None, :, None]).sum(1) - offset
    return torch.empty_like(wg).scatter_(1, layer.long_sort_index(), wg).reshape(layer._weight_shape())


def layer_output(layer, x: torch.Tensor, rows_fn, linear_fn, groups: int = 1,
                 calibrating: bool = False, cells: torch.Tensor | None = None,
                 conv_fn=None) -> torch.Tensor:
    """The analog output rows (N, out) float32 of the layer for its input ``x``, no bias.

    ``rows_fn(x)``: the input rows (N, groups * K) the crossbar sees (im2col for a
    convolution); ``linear_fn(x64, w64)``: the layer's op in float64 with weight ``w64``, as
    rows (N, out). ``cells``: levels to compute with instead of the held ones. ``conv_fn(x, w)``
    (ungrouped convolutions): the convolution as rows, which lets ``adc_scope="weight"`` run one
    convolution per section over the channels it spans instead of im2col."""
    cfg = layer.config
    if calibrating:
        _calibrate_input(layer, x)
    s_x = input_scale(layer, x)
    scale = layer.scale.to(torch.float64)
    if cfg.adc_bits is None:  # linear: the shift-and-add collapses into one float64 op
        acc = linear_fn(_quantize(layer, x, s_x), linear_weight(layer, cells))
    elif cfg.adc_scope == "weight":  # ideal whole weights: partial sums by GEMMs
        acc = _weight_scope(layer, x, rows_fn, groups, s_x, cells, calibrating, conv_fn)
    else:
        rows = rows_fn(x).to(torch.float32).contiguous()
        g, w_cells, offset, g0 = _cells_and_weights(layer, cells)
        pmax = None
        if calibrating and cfg.adc_range == "calibrated":
            _, pmax = _matmul(layer, rows, g, w_cells, torch.ones_like(w_cells), groups, s_x, 0,
                              g0, offset)
        acc, _ = _matmul(layer, rows, g, w_cells, adc_steps(layer, pmax), groups, s_x,
                         cfg.adc_bits, g0, offset)
        if pmax is not None:
            layer.adc_range = torch.tensor(slice_ranges(layer, pmax), dtype=torch.float64,
                                           device=layer.cells.device)
    return (acc * (s_x * scale)[None, :]).to(torch.float32)


def _weight_scope(layer, x, rows_fn, groups, s_x, cells, calibrating, conv_fn=None):
    """Rule 18 with ``adc_scope = "weight"``: P[n, o, s] = sum over the rows of section s of
    q_eff * xq, one signed ADC per section, summed. The sections are GEMMs over the inputs: a
    slice of K each without sorting (for an ungrouped convolution, one convolution over the
    channels the section spans), one masked GEMM per section with it. Exact: every partial
    sum is an integer below 2**24 in float32 (float64 when it could be larger), the step a
    power of two, and the codes are added as integers."""
    cfg = layer.config
    held = layer.held_cells() if cells is None else cells
    q_sorted = layer.held_op("decode", ops.decode, held, cfg.weight_bits, cfg.bits_per_cell,
                             cfg.encoding_id)
    out, K = q_sorted.shape
    index = layer.long_sort_index()  # int64 for scatter, this call only
    q = torch.empty_like(q_sorted).scatter_(1, index, q_sorted)   # original order
    bound = cfg.rows * cfg.qmax * (2 ** cfg.input_bits - 1)
    dt = torch.float32 if bound < 2 ** 24 else torch.float64
    identity = bool((index == torch.arange(K, device=q.device)).all())
    sections = [(k0, min(K, k0 + cfg.rows)) for k0 in range(0, K, cfg.rows)]
    if identity and conv_fn is not None and groups == 1:
        xq = _quantize(layer, x, s_x).to(dt)                  # (B, C, H, W), no im2col
        per_channel = K // x.shape[1]
        qc = q.to(dt).view(out, x.shape[1], -1)

        def partial(k0, k1):
            c0, c1 = k0 // per_channel, -(-k1 // per_channel)
            w = qc[:, c0:c1].reshape(out, -1).clone()
            w[:, :k0 - c0 * per_channel] = 0                  # the section's rows only
            w[:, k1 - c0 * per_channel:] = 0
            return conv_fn(xq[:, c0:c1], w.view(out, c1 - c0, *layer.kernel_size))
    else:
        xq = _quantize(layer, rows_fn(x), s_x).to(dt)         # (N, groups * K)
        N, per = xq.shape[0], out // groups
        xg = xq.view(N, groups, K).transpose(0, 1)            # (groups, N, K)
        if not identity:
            section = torch.empty_like(index).scatter_(
                1, index, torch.arange(K, device=q.device).expand(out, K)
                .contiguous()) // cfg.rows                   # section of each original k

        def partial(k0, k1):
            if identity:
                w = q[:, k0:k1].to(dt).view(groups, per, k1 - k0)
                p = torch.bmm(xg[:, :, k0:k1], w.transpose(1, 2))
            else:
                w = torch.where(section == k0 // cfg.rows, q, torch.zeros_like(q)).to(dt)
                p = torch.bmm(xg, w.view(groups, per, K).transpose(1, 2))
            return p.transpose(0, 1).reshape(N, out)
    parts = [partial(k0, k1) for k0, k1 in sections]
    if not parts:
        n = rows_fn(x).shape[0]
        return torch.zeros(n, out, dtype=torch.float64, device=x.device)
    if calibrating and cfg.adc_range == "calibrated":
        top = max(float(p.abs().max()) if p.numel() else 0.0 for p in parts)
        layer.adc_range = torch.tensor([top], dtype=torch.float64, device=layer.cells.device)
    step = float(adc_steps(layer)[0])
    hi = float(2 ** (cfg.adc_bits - 1) - 1)
    codes = None
    for p in parts:  # integer codes, added exactly (|sum| < sections * 2**(A-1))
        c = p.div_(step).round_().clamp_(-hi, hi)
        codes = c if codes is None else codes.add_(c)
    return codes.to(torch.float64) * step


def _matmul(layer, x, g, w_cells, steps, groups, s_x, adc_bits, g0, offset):
    cfg = layer.config
    return layer.held_op("analog_matmul", ops.analog_matmul, x, g, layer.long_sort_index(),
                         w_cells.to(x.device), steps.to(x.device), groups, cfg.rows,
                         cfg.input_bits or 0, cfg.input_bits_per_cycle, s_x, adc_bits, g0, offset,
                         cfg.adc_scope == "weight")


def _calibrate_input(layer, x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        raise InvalidTensorError(f"calibrate: the input of layer {layer.layer_name!r} holds NaN or Inf")
    cfg = layer.config
    # a DAC, or a full-range ADC fed with real inputs, needs the input's full scale (rule 18)
    if cfg.input_range is None and (cfg.input_bits is not None or (
            cfg.adc_bits is not None and cfg.adc_range == "full")):
        top = float(x.abs().max()) if x.numel() else 0.0
        layer.input_range = torch.tensor([top if top > 0 else 1.0], dtype=torch.float32,
                                         device=layer.cells.device)


# ---- calibration mode (rule 20; crossbar_torch.nn.calibration runs it) ----------------------

_CALIBRATING = []


def is_calibrating() -> bool:
    return bool(_CALIBRATING)


@contextlib.contextmanager
def calibrating():
    """Within: every crossbar layer's forward calibrates its ranges (rule 20)."""
    _CALIBRATING.append(True)
    try:
        yield
    finally:
        _CALIBRATING.pop()


# ---- latent mode (rule 26's output gains; crossbar_torch.nn.gains runs it) -------------------

_LATENT = []


def is_latent() -> bool:
    return bool(_LATENT)


@contextlib.contextmanager
def latent_weights():
    """Within: every crossbar layer computes with its latent float weight, as the float model
    does (no cells, no periphery): rule 26 measures the float model's output gains."""
    _LATENT.append(True)
    try:
        yield
    finally:
        _LATENT.pop()
