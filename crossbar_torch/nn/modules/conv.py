"""CrossbarConv2d: nn.Conv2d whose weight lives in bit-sliced crossbars."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...config import CrossbarConfig
from ...threads import in_halves, splits
from .base import CrossbarMixin


class CrossbarConv2d(CrossbarMixin, nn.Module):
    """nn.Conv2d (any groups / dilation / padding mode, timm's dynamic 'same' padding and
    weight standardization) computed with the weights held by crossbars."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 config: CrossbarConfig | None = None, *, dynamic_same_pad: bool = False,
                 std_eps: float | None = None, std_gain: bool = False, std_scale: float = 1.0,
                 device=None, dtype=None):
        super().__init__()
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = pair(kernel_size), pair(stride)
        self.padding = padding if isinstance(padding, str) else pair(padding)
        self.dilation, self.groups, self.padding_mode = pair(dilation), groups, padding_mode
        if padding_mode != "zeros":
            if isinstance(self.padding, str):
                raise ValueError("string padding with a non-zeros padding_mode is not supported")
            self._reversed_padding_repeated_twice = nn.modules.utils._reverse_repeat_tuple(
                self.padding, 2)
        self.dynamic_same_pad = dynamic_same_pad
        self.std_eps = std_eps
        self.std_scale = std_scale
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.bias = (nn.Parameter(torch.zeros(out_channels, device=device, dtype=dtype))
                     if bias else None)
        self.gain = (nn.Parameter(torch.ones(out_channels, 1, 1, 1, device=device, dtype=dtype))
                     if std_gain else None)
        k = shape[1] * shape[2] * shape[3]
        self._init_crossbar(config or CrossbarConfig(), out_channels, k)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, config: CrossbarConfig, *, dynamic_same_pad=False,
                  std_eps=None, std_gain=False, std_scale=1.0,
                  encode: bool = True) -> "CrossbarConv2d":
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                conv.padding_mode, config, dynamic_same_pad=dynamic_same_pad, std_eps=std_eps,
                std_gain=std_gain, std_scale=std_scale, device=conv.weight.device,
                dtype=conv.weight.dtype)
        with torch.no_grad():
            m.weight.copy_(conv.weight)
            if conv.bias is not None:
                m.bias.copy_(conv.bias)
            if std_gain:
                m.gain.copy_(conv.gain)
        m.quantize_and_sort(encode)
        m.train(conv.training)
        return m

    def matrix_weight(self) -> torch.Tensor:
        w = self.weight.flatten(1)
        if self.std_eps is not None:
            # timm StdConv2d / ScaledStdConv2d: the crossbar holds the standardized weight
            gain = (self.gain * self.std_scale).view(-1) if self.gain is not None else None
            w = F.batch_norm(w.unsqueeze(0), None, None, weight=gain, training=True,
                             momentum=0.0, eps=self.std_eps).squeeze(0)
        return w

    def _pad(self, x: torch.Tensor):
        """The input as the convolution reads it, and the padding left to the convolution."""
        padding = self.padding
        if self.dynamic_same_pad:
            from timm.layers.padding import pad_same
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
            padding = 0
        elif self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return x, padding

    def _numeric_padding(self, x: torch.Tensor, padding):
        """String padding ('valid' / 'same', stride 1) applied explicitly, for im2col."""
        if isinstance(padding, str):
            if padding == "same":
                pads = []
                for k, d in zip(reversed(self.kernel_size), reversed(self.dilation)):
                    total = d * (k - 1)
                    pads += [total // 2, total - total // 2]
                x = F.pad(x, pads)
            padding = 0
        return x, padding

    @property
    def moment_groups(self) -> int:  # rule 21: one input second moment per group
        return self.groups

    def input_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The im2col rows (N * positions, groups * K) the crossbars read for input ``x``, in
        the weight's (channel, kh, kw) order (rule 21's moments)."""
        x, padding = self._numeric_padding(*self._pad(x))
        cols = F.unfold(x, self.kernel_size, self.dilation, padding, self.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, padding = self._pad(x)
        if self.config.analog:
            return self._analog_conv(x, padding)
        w = self.weight_for_forward()
        args = (w, self.bias, self.stride, padding, self.dilation, self.groups)
        if splits(x):  # calibration: the same bits on every thread count
            if x.dim() == 3:  # unbatched
                return in_halves(F.conv2d, x[None], *args)[0]
            return in_halves(F.conv2d, x, *args)
        return F.conv2d(x, *args)

    def _analog_conv(self, x: torch.Tensor, padding) -> torch.Tensor:
        """The convolution as rows of im2col columns through the analog periphery."""
        x, padding = self._numeric_padding(x, padding)
        padding = nn.modules.utils._pair(padding)
        B, _, H, W = x.shape
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        ph, pw = padding
        Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1

        def rows_fn(inp):  # im2col: one row per output position, (channel, kh, kw) order
            cols = F.unfold(inp, self.kernel_size, self.dilation, padding, self.stride)
            return cols.transpose(1, 2).reshape(B * Ho * Wo, -1)

        def apply_fn(inp, w):
            return F.conv2d(inp, w.to(inp.dtype), None, self.stride, padding, self.dilation,
                            self.groups).permute(0, 2, 3, 1).reshape(B * Ho * Wo, -1)

        def conv_fn(inp, w):  # ungrouped: one convolution per section (adc_scope "weight")
            return F.conv2d(inp, w, None, self.stride, padding, self.dilation) \
                .permute(0, 2, 3, 1).reshape(B * Ho * Wo, -1)

        y = self.analog_forward(x, rows_fn, apply_fn, self.groups, conv_fn)
        y = y.reshape(B, Ho, Wo, -1).permute(0, 3, 1, 2)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        if self.dynamic_same_pad:
            s += ", same_pad=dynamic"
        if self.std_eps is not None:
            s += f", weight_std(eps={self.std_eps})"
        return s + ", " + self.crossbar_repr()
