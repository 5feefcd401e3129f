"""Plain-PyTorch reference of the ``analog_matmul`` op (docs/semantics.md rules 17 and 18).

Written from the rules, loop by loop (sections, passes, cycles, cells), for clarity rather than
speed: the C++ / CUDA kernels are held to it in the tests. Everything is float64 except the
input quantization, which is float32 as the rules say.
"""
from __future__ import annotations

import math

import torch

from ..quantization import adc_step  # noqa: F401 (rule 18's step: the runtime's own)


def input_digits(x: torch.Tensor, input_bits: int, per_cycle: int, input_scale: float,
                 signed_single: bool):
    """Rule 17: the digit planes driven on the rows, as ``[(sign, weight, digits (N, Kin)
    float64), ...]`` over passes and cycles, and the signed quantized inputs ``xs`` (float64).

    ``input_bits`` 0: ideal DAC, one cycle per pass with the real magnitudes.
    ``signed_single``: one signed cycle (adc_scope "weight")."""
    x = x.to(torch.float32)
    if input_bits == 0:
        xs = x.to(torch.float64)
    else:
        top = float(2 ** input_bits - 1)
        xs = torch.clamp(torch.round(x / torch.tensor(input_scale, dtype=torch.float32)),
                         -top, top).to(torch.float64)
    if signed_single:
        return [(1.0, 1.0, xs)], xs
    planes = []
    for sign, part in ((1.0, torch.clamp(xs, min=0)), (-1.0, torch.clamp(-xs, min=0))):
        if input_bits == 0:
            planes.append((sign, 1.0, part))
            continue
        mag = part.to(torch.int64)
        mask = 2 ** per_cycle - 1
        for j in range(math.ceil(input_bits / per_cycle)):
            planes.append((sign, float(2 ** (per_cycle * j)),
                           ((mag >> (per_cycle * j)) & mask).to(torch.float64)))
    return planes, xs


def adc(p: torch.Tensor, step: float, bits: int, signed: bool) -> torch.Tensor:
    """Rule 18: code = clamp(round_half_even(P / step), lo, hi); returns code * step."""
    if bits == 0:
        return p
    hi = float(2 ** (bits - 1) - 1) if signed else float(2 ** bits - 1)
    lo = -hi if signed else 0.0
    return torch.clamp(torch.round(p / step), lo, hi) * step


def analog_matmul(x: torch.Tensor, g: torch.Tensor, sort_index: torch.Tensor,
                  cell_weight: torch.Tensor, adc_steps: torch.Tensor, groups: int, rows: int,
                  input_bits: int, input_bits_per_cycle: int, input_scale: float,
                  adc_bits: int, g0: float, encoding_offset: float, signed_weights: bool):
    """Returns ``(acc (N, out) float64, pmax (c,) float64)``.

    * ``x`` float32 (N, groups * K): the layer's input rows (im2col for a convolution).
    * ``g`` float32 (out, c, K): each cell's conductance in level units, sorted order (for
      ``signed_weights``, c = 1 and g holds the signed effective weight).
    * ``sort_index`` int64 (out, K); filter o reads ``x[:, G(o) * K + sort_index[o, k']]``.
    * ``cell_weight`` float64 (c,): w_i; ``adc_steps`` float64 (c,): the ADC step per cell
      (ignored when ``adc_bits`` is 0).
    * ``acc``: the digital shift-and-add sum of rule 18; ``pmax``: the largest partial sum
      (largest |P| for ``signed_weights``) of each cell before the ADC.
    """
    N = x.shape[0]
    out, c, K = g.shape
    per_group = out // groups if groups else 0
    planes, xs = input_digits(x, input_bits, input_bits_per_cycle, input_scale, signed_weights)
    acc = torch.zeros(N, out, dtype=torch.float64)
    pmax = torch.zeros(c, dtype=torch.float64)
    if N == 0 or out == 0:
        return acc, pmax
    base = (torch.arange(out) // per_group * K)[:, None]
    src = base + sort_index                                   # (out, K) input column per row
    gd = g.to(torch.float64)
    for s in range(math.ceil(K / rows)):
        k0, k1 = s * rows, min(K, (s + 1) * rows)
        cols = src[:, k0:k1]                                  # (out, r)
        for sign, weight, digits in planes:
            d = digits[:, cols]                               # (N, out, r)
            dsum = d.sum(-1)
            for i in range(c):
                p = (d * gd[None, :, i, k0:k1]).sum(-1)       # (N, out)
                pm = p.abs().max() if signed_weights else p.max()
                pmax[i] = torch.maximum(pmax[i], pm)
                v = adc(p, float(adc_steps[i]), adc_bits, signed_weights) - g0 * dsum
                acc += sign * weight * float(cell_weight[i]) * v
    if encoding_offset:
        acc -= encoding_offset * torch.stack(
            [xs[:, (o // per_group) * K:(o // per_group + 1) * K].sum(1) for o in range(out)], 1)
    return acc, pmax
