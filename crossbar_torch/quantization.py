"""Per-layer pure stages: weight checks, quantization (rule 2) and the sort index (rule 4)."""
from __future__ import annotations

import torch

from .config import CrossbarConfig
from .ops import reference


def check_weight(w: torch.Tensor, name: str = "weight") -> None:
    if not torch.is_floating_point(w):
        raise TypeError(f"{name} must be a floating point tensor, got {w.dtype}")
    # fast path: a finite sum means every element is finite (NaN / Inf propagate)
    if w.numel() and not bool(torch.isfinite(w.sum())) and not bool(torch.isfinite(w).all()):
        bad = (~torch.isfinite(w)).sum().item()
        raise ValueError(f"{name} holds {bad} NaN or Inf value(s); a crossbar cannot store them")


def quantize(w2d: torch.Tensor, config: CrossbarConfig):
    """Rule 2 on a (out, K) weight matrix: (q int32, s float32 (out,)), in float32."""
    check_weight(w2d)
    return reference.quantize(w2d, config.weight_bits, config.quant == "per_channel")


def sort_index(q: torch.Tensor, config: CrossbarConfig) -> torch.Tensor:
    """Rule 4: the layer's sort index (out, K) int64; position k' holds weight index[o, k']."""
    return reference.sort_index(q, config.sort)
