"""CrossbarLinear: nn.Linear whose weight lives in bit-sliced crossbars."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...config import CrossbarConfig
from ...threads import linear_in_halves, splits
from .base import CrossbarMixin


class CrossbarLinear(CrossbarMixin, nn.Module):
    """nn.Linear computed with the weights held by crossbars."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 config: CrossbarConfig | None = None, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device,
                                               dtype=dtype))
        self.bias = (nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
                     if bias else None)
        self._init_crossbar(config or CrossbarConfig(), out_features, in_features)

    @classmethod
    def from_linear(cls, lin: nn.Linear, config: CrossbarConfig,
                    encode: bool = True) -> "CrossbarLinear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, config,
                device=lin.weight.device, dtype=lin.weight.dtype)
        with torch.no_grad():
            m.weight.copy_(lin.weight)
            if lin.bias is not None:
                m.bias.copy_(lin.bias)
        m.quantize_and_sort(encode)
        m.train(lin.training)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.analog:
            rows = x.reshape(-1, x.shape[-1])
            y = self.analog_forward(rows, lambda r: r, lambda r, w: F.linear(r, w.to(r.dtype)))
            y = y.reshape(*x.shape[:-1], y.shape[-1])
            return y if self.bias is None else y + self.bias
        w = self.weight_for_forward()
        if splits(x):  # calibration: the same bits on every thread count
            rows = linear_in_halves(x.reshape(-1, x.shape[-1]), w, self.bias)
            return rows.reshape(*x.shape[:-1], rows.shape[-1])
        return F.linear(x, w, self.bias)

    moment_groups = 1  # rule 21: one input second moment
    # its rows are its input's rows: layers reading one tensor share their moment products
    shares_input_rows = True

    def input_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The rows (N, in_features) the crossbars read for input ``x`` (rule 21's moments)."""
        return x.reshape(-1, x.shape[-1])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self.crossbar_repr()}")
