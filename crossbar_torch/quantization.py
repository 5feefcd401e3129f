"""Per-layer pure stages: weight checks, quantization (rule 2), the sort index (rule 4) and
the ADC step (rule 18).
Semantics: docs/semantics.md."""
from __future__ import annotations

import math

import torch

from . import ops
from .config import CrossbarConfig
from .errors import InvalidTensorError, TensorTypeError


def check_weight(w: torch.Tensor, name: str = "weight") -> None:
    if not torch.is_floating_point(w):
        raise TensorTypeError(f"{name} must be a floating point tensor, got {w.dtype}")
    # fast path: a finite sum means every element is finite (NaN / Inf propagate)
    if w.numel() and not bool(torch.isfinite(w.sum())) and not bool(torch.isfinite(w).all()):
        bad = (~torch.isfinite(w)).sum().item()
        raise InvalidTensorError(f"{name} holds {bad} NaN or Inf value(s); a crossbar cannot store them")


def quantize_rows(w: torch.Tensor, weight_bits: int, per_channel: bool):
    """Rule 2. ``w`` is (out, K); returns (q int32 (out, K), s float32 (out,)), in float32."""
    w = w.detach().to(torch.float32)
    qmax = 2 ** (weight_bits - 1) - 1
    if per_channel:
        amax = w.abs().amax(dim=1) if w.shape[1] > 0 else torch.zeros(w.shape[0])
    else:
        amax = (w.abs().amax() if w.numel() else torch.zeros(())).expand(w.shape[0])
    s = amax / torch.tensor(qmax, dtype=torch.float32)
    # s = 1 for an all-zero row (rule 2), and also where amax / qmax underflows to 0 in
    # float32 (|w| < ~1.8e-43): such a row quantizes to zeros either way
    s = torch.where(s == 0, torch.ones_like(s), s).contiguous()
    q = torch.clamp(torch.round(w / s[:, None]), -qmax, qmax).to(torch.int32)
    return q, s


def quantize_with_scale(w: torch.Tensor, s: torch.Tensor, weight_bits: int) -> torch.Tensor:
    """Rule 2 with fixed scales (fine-tuned weights: the scales stay those of conversion)."""
    qmax = 2 ** (weight_bits - 1) - 1
    w = w.to(torch.float32)
    return torch.clamp(torch.round(w / s[:, None]), -qmax, qmax).to(torch.int32)


def sort_rows(q: torch.Tensor, key: str) -> torch.Tensor:
    """Rule 4: per-row stable descending order of |q| (magnitude) or q (value); int64."""
    if key == "none":
        return torch.arange(q.shape[1], dtype=torch.int64).expand(q.shape[0], -1).contiguous()
    k = q.abs() if key == "magnitude" else q
    if k.device.type == "cpu" and k.dtype in (torch.int32, torch.int16, torch.int8, torch.uint8):
        return ops.sort_index(k.to(torch.int32))  # a counting sort over the levels (host only)
    return torch.sort(k, dim=1, descending=True, stable=True).indices.contiguous()


def quantize(w2d: torch.Tensor, config: CrossbarConfig):
    """Rule 2 on a (out, K) weight matrix: (q int32, s float32 (out,)), in float32."""
    check_weight(w2d)
    return quantize_rows(w2d, config.weight_bits, config.quant == "per_channel")


def sort_index(q: torch.Tensor, config: CrossbarConfig) -> torch.Tensor:
    """Rule 4: the layer's sort index (out, K) int64; position k' holds weight index[o, k']."""
    return sort_rows(q, config.sort)


def adc_step(r: float, bits: int, signed: bool = False) -> float:
    """Rule 18: 2**(e - A) (unsigned) or 2**(e - (A - 1)) (signed), e the smallest integer with
    2**e > R. R = 0 (nothing to convert) gives the step of R = 1."""
    r = max(float(r), 0.0)
    e = math.floor(math.log2(r)) + 1 if r > 0 else 1
    while 2.0 ** e <= r:  # guard the float log
        e += 1
    while r > 0 and e > -1074 and 2.0 ** (e - 1) > r:
        e -= 1
    return 2.0 ** (e - (bits - 1 if signed else bits))


def index_dtype(k: int) -> torch.dtype:
    """The narrowest integer type that holds the indices [0, k) of a sort index."""
    return torch.int16 if k - 1 <= torch.iinfo(torch.int16).max else torch.int32
