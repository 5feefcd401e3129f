"""CrossbarLinear / CrossbarConv2d: layers whose weights live in bit-sliced crossbars.

Each layer holds, as buffers that round-trip through ``state_dict``:

* ``scale``      float32 (out,)       quantization scale per row (fixed after conversion)
* ``sort_index`` int64 (out, K)       position k' of the sorted filter holds weight index[o, k']
* ``cells``      uint8 (out, K, c)    the cell levels the crossbars hold (sorted order), i.e. the
                                      conductance states after programming (docs/semantics.md rule 9)
* ``stuck``      bool (out, K, c)     cells that are stuck (empty when the config has no stucking)
* ``filter_index`` int64 (nb*F,)      filter placement (rule 11): the filter in column block j,
                                      slot f is filter_index[j*F + f]; -1 marks an unused slot
* ``tile_order`` int64 (tiles,)       the order the layer's tiles are programmed in (rule 12;
                                      chosen by the first programming, replayed afterwards)

and the latent float ``weight`` stays a parameter for fine-tuning.

Eval mode computes with the effective weights decoded from ``cells`` (cached once per
programming, then the native GEMM / conv). Train mode simulates programming the *current* latent
weight (quantize with the fixed scales, gather through the fixed sort index, encode, keep the
stuck cells' levels, compensate (rule 13) when configured, decode, un-sort) and passes the
gradient straight through to the latent weight. Semantics: docs/semantics.md.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..config import COUNTING_FIELDS, CrossbarConfig
from ..mapping import check_filter_index, filter_index, layer_tiles, natural_filter_index
from ..quantization import quantize, sort_index


# What a crossbar layer keeps beside the parameters of the layer it replaced.
CROSSBAR_BUFFERS = ("scale", "sort_index", "cells", "stuck", "filter_index", "tile_order",
                    "input_range", "adc_range", "prog_eps", "drift_nu", "input_moment",
                    "_extra_state")
# Rules 17 to 21: empty unless the periphery (or rule 21's input moment E[x x^T], float32
# (groups, K, K)) needs them; their size depends on the config and calibration, and state dicts
# from before they existed load without them.
ANALOG_BUFFERS = {"input_range": torch.float32, "adc_range": torch.float64,
                  "prog_eps": torch.float32, "drift_nu": torch.float32,
                  "input_moment": torch.float32}


class CrossbarMixin:
    """What CrossbarLinear and CrossbarConv2d share: buffers, programming state, weights."""

    config: CrossbarConfig

    def _init_crossbar(self, config: CrossbarConfig, out_features: int, k: int) -> None:
        self.config = config
        c = config.cells_per_weight
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("sort_index", torch.arange(k, dtype=torch.int64)
                             .expand(out_features, k).contiguous())
        self.register_buffer("cells", torch.zeros(out_features, k, c, dtype=torch.uint8))
        self.register_buffer("stuck", torch.zeros(0, dtype=torch.bool))
        self.register_buffer("filter_index", natural_filter_index(out_features, config))
        self.register_buffer("tile_order", torch.zeros(0, dtype=torch.int64))
        for name, dtype in ANALOG_BUFFERS.items():
            self.register_buffer(name, torch.zeros(0, dtype=dtype))
        self.layer_number, self.layer_name = 0, type(self).__name__  # set by convert
        self._forward_count = 0  # read-noise draws (rule 19)
        self._eff_cache = None
        self._linear_cache = None
        self._programmed_version = None
        self._programmed_checksum = 0.0
        self._stale_warned = False

    # ---- the weight the layer computes with, as an (out, K) matrix -----------------------
    def matrix_weight(self) -> torch.Tensor:
        """The float weight the original layer actually used, flattened to (out, K)."""
        return self.weight.flatten(1)

    def _weight_shape(self):
        return self.weight.shape

    # ---- conversion-time setup --------------------------------------------------------------
    @torch.no_grad()
    def quantize_and_sort(self, encode: bool = True) -> None:
        """Compute scales and the sort index from the current weight (once, at conversion).
        With ``encode`` the cells are set to the ideal (unstuck) levels; convert() skips that
        when it programs the model right after."""
        w = self.matrix_weight().detach().float().cpu()
        q, s = quantize(w, self.config)
        self.scale.copy_(s.to(self.scale.device))
        self.sort_index = sort_index(q, self.config).to(self.sort_index.device)
        self.filter_index = filter_index(q, self.config).to(self.filter_index.device)
        if encode:
            self.set_cells(self.target_cells(), None)

    def target_cells(self) -> torch.Tensor:
        """Cell levels that programming the current latent weight asks for (sorted order)."""
        w = self.matrix_weight().detach().to(torch.float32).contiguous()
        cfg = self.config  # the kernel refuses NaN / Inf weights
        return ops.sort_and_encode(w, self.scale, self.sort_index, cfg.weight_bits,
                                   cfg.bits_per_cell, cfg.encoding_id)

    def set_cells(self, cells: torch.Tensor, stuck: torch.Tensor | None,
                  tile_order: torch.Tensor | None = None) -> None:
        """Store what the crossbars hold after programming (called by the programmer), and the
        tile order the programming used (replayed by later programmings)."""
        self.cells = cells.to(self.cells.device).contiguous()
        self.stuck = (stuck.to(self.cells.device).contiguous() if stuck is not None
                      else torch.zeros(0, dtype=torch.bool, device=self.cells.device))
        if tile_order is not None:
            self.tile_order = tile_order.to(self.tile_order.device, torch.int64).contiguous()
        self._eff_cache = None
        self._linear_cache = None
        self._mark_programmed()

    # ---- is the latent weight still the one the crossbars were programmed with? -------------
    # The version counter says when the weight changed in place; it is compared only for the
    # same tensor object (deepcopy, .to() and load_state_dict give new objects with fresh
    # counters: then a checksum of the values decides). Inference tensors have no counter and
    # cannot change outside inference_mode: they are not checked. torch.compile skips the check.
    def _weight_stamp(self):
        w = self.weight
        if w.is_inference():
            return None
        return id(w), w._version

    def _weight_checksum(self) -> float | None:
        if self.weight.is_meta:  # no values to compare
            return None
        with torch.no_grad():
            return float(self.weight.detach().double().sum()) if self.weight.numel() else 0.0

    def _mark_programmed(self) -> None:
        self._programmed_version = self._weight_stamp()
        self._programmed_checksum = self._weight_checksum()
        self._stale_warned = False

    def _weight_changed(self) -> bool:
        if self._programmed_version is None or torch.compiler.is_compiling():
            return False
        now = self._weight_stamp()
        if now is None:
            return False
        if now[0] == self._programmed_version[0]:
            return now[1] != self._programmed_version[1]
        # another tensor object: compare values, then follow the new object's counter
        now_sum = self._weight_checksum()
        changed = (now_sum is not None and self._programmed_checksum is not None
                   and now_sum != self._programmed_checksum)
        if not changed:
            self._programmed_version = now
        return changed

    # ---- effective weights --------------------------------------------------------------------
    def _decode(self, cells: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        w = ops.effective_weight(cells, self.sort_index, self.scale, cfg.weight_bits,
                                 cfg.bits_per_cell, cfg.encoding_id)
        return w.reshape(self._weight_shape()).to(self.weight.dtype)

    def effective_weight(self) -> torch.Tensor:
        """The weight the crossbars compute with: decoded held cells, un-sorted, times scale."""
        if self._eff_cache is None:
            with torch.no_grad():
                self._eff_cache = self._decode(self.cells)
        return self._eff_cache

    def effective_q(self) -> torch.Tensor:
        """Integer effective weights q_eff (out, K) in the original order (rule 9)."""
        cfg = self.config
        q_sorted = ops.decode(self.cells, cfg.weight_bits, cfg.bits_per_cell, cfg.encoding_id)
        q = torch.empty_like(q_sorted)
        q.scatter_(1, self.sort_index, q_sorted)
        return q

    def simulated_cells(self) -> torch.Tensor:
        """The cells programming the current latent weight would leave (sorted order)."""
        target = self.target_cells()
        if self.stuck.numel():
            # what programming would leave: the stuck cells keep their levels, and with rule 13
            # the free cells compensate (the write tie-break measured against the held cells)
            cfg = self.config.for_layer(self.layer_name)  # rule 22: this layer's policy
            target = ops.compensate(target, self.stuck, self.cells, cfg.weight_bits,
                                    cfg.bits_per_cell, cfg.encoding_id,
                                    cfg.stuck_slices if cfg.compensate else 0)
        return target

    def simulated_weight(self, cells: torch.Tensor | None = None) -> torch.Tensor:
        """Train mode: effective weight of the current latent weight with the stuck cells kept.
        The quantizer (and the stuck cells) are passed straight through: the gradient with
        respect to the latent weight is the gradient with respect to the effective weight."""
        w_eff = self._decode(self.simulated_cells() if cells is None else cells)
        # only the quantizer is skipped by the gradient: StdConv2d-style weight
        # standardization stays differentiable, so its raw weight and gain are trained too
        w = self.matrix_weight().reshape(self._weight_shape())
        # w - w.detach() is exactly 0 for finite w, so the value is w_eff bit for bit (train
        # and eval compute the same numbers) while d/dw is the identity
        return w_eff.detach() + (w - w.detach())

    def weight_for_forward(self) -> torch.Tensor:
        if self.training:  # simulate programming the current latent weight (fine-tuning)
            return self.simulated_weight()
        self._warn_if_stale()
        return self.effective_weight()

    def _warn_if_stale(self) -> None:
        if not self._stale_warned and self._weight_changed():
            warnings.warn(f"{type(self).__name__}: the latent weight changed since the crossbars "
                          "were programmed; eval uses what the crossbars hold. Call "
                          "crossbar_torch.reprogram(model) to program the new weights.",
                          stacklevel=4)
            self._stale_warned = True

    # ---- the analog periphery (rules 17 to 20) ----------------------------------------------
    def analog_forward(self, x: torch.Tensor, rows_fn, apply_fn, groups: int = 1, conv_fn=None):
        """The output rows (N, out) for input ``x`` through the DAC, the crossbar's
        conductances and the ADC (rules 17 to 20), without bias. ``rows_fn(x)``: the input rows
        (N, groups*K); ``apply_fn(x, w)``: the layer's op with weight ``w``, as rows. In train
        mode the result carries the ideal path's gradient (a straight-through estimator)."""
        from . import analog
        calibrating = analog.is_calibrating()
        if not self.training:
            self._warn_if_stale()
            with torch.no_grad():
                return analog.layer_output(self, x, rows_fn, apply_fn, groups,
                                           calibrating=calibrating, conv_fn=conv_fn).to(x.dtype)
        cells = self.simulated_cells()
        with torch.no_grad():
            y = analog.layer_output(self, x.detach(), rows_fn, apply_fn, groups, cells=cells,
                                    calibrating=calibrating, conv_fn=conv_fn).to(x.dtype)
        y_ideal = apply_fn(x, self.simulated_weight(cells))
        # y_ideal - y_ideal.detach() is exactly 0 (finite values): the value is the analog y
        # bit for bit, the gradient that of the ideal path
        return y + (y_ideal - y_ideal.detach())

    # ---- state dict: the config travels with the buffers ------------------------------------
    def get_extra_state(self):
        return {"crossbar_config": self.config.to_dict()}

    def set_extra_state(self, state) -> None:
        pass  # checked (before the buffers) in _load_from_state_dict

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        layer = prefix.rstrip('.') or '<root>'
        key = prefix + "_extra_state"
        if key in state_dict:
            # fields a saved config predates hold their defaults (rules 11 to 13 came later)
            theirs = {**CrossbarConfig().to_dict(),
                      **dict(state_dict[key].get("crossbar_config", {}))}
            mine = self.config.to_dict()
            for k in COUNTING_FIELDS:  # counting only: the loaded model keeps its own
                theirs.pop(k, None)
                mine.pop(k, None)
            if theirs != mine:
                diff = {k: (theirs.get(k), mine.get(k)) for k in set(theirs) | set(mine)
                        if theirs.get(k) != mine.get(k)}
                raise RuntimeError(
                    f"crossbar layer {layer}: the state dict was made "
                    f"with a different CrossbarConfig (field: (saved, this model)) {diff}; "
                    "convert the model with the saved config before loading")
        self._check_loaded_buffers(state_dict, prefix, layer)
        # `stuck` is empty without stucking, `tile_order` before the first programming: resize
        # them to what is being loaded
        skey = prefix + "stuck"
        if skey in state_dict:
            self.stuck = torch.empty_like(state_dict[skey], device=self.cells.device)
        for name in ANALOG_BUFFERS:
            akey = prefix + name
            if akey in state_dict:
                setattr(self, name, torch.empty_like(state_dict[akey], device=self.cells.device))
            else:  # saved before the analog periphery existed: uncalibrated, noiseless
                state_dict[akey] = getattr(self, name).new_zeros(0)
        okey = prefix + "tile_order"
        if okey in state_dict:
            self.tile_order = torch.empty_like(state_dict[okey], device=self.cells.device)
        else:  # saved before tile orders were kept: the first programming chooses one
            self.tile_order = self.tile_order.new_zeros(0)
            state_dict[okey] = self.tile_order
        fkey = prefix + "filter_index"
        if fkey in state_dict:
            why = check_filter_index(state_dict[fkey], self.cells.shape[0], self.config)
            if why:
                raise RuntimeError(f"crossbar layer {layer}: filter_index {why}")
        else:  # saved before filter placement existed: the natural one
            state_dict[fkey] = natural_filter_index(self.cells.shape[0], self.config)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._eff_cache = None
        self._linear_cache = None
        self._mark_programmed()

    def _check_loaded_buffers(self, state_dict, prefix, layer) -> None:
        """Refuse a loaded buffer that no programming can have produced (a tampered or corrupt
        file), naming the layer and the buffer, before anything is copied: load_state_dict
        would otherwise cast dtypes silently (int64 levels wrapping into uint8) and the errors
        would surface later, far from their cause. filter_index is checked by the caller."""
        cfg = self.config
        out, k, c = self.cells.shape
        top = (1 << cfg.bits_per_cell) - 1

        def bad(name, why):
            raise RuntimeError(f"crossbar layer {layer}: buffer '{name}' {why}")

        def loaded(name, dtypes, shapes):
            t = state_dict.get(prefix + name)
            if t is None:  # missing keys are load_state_dict's to report
                return None
            if not isinstance(t, torch.Tensor):
                bad(name, f"must be a tensor, got {type(t).__name__}")
            if t.dtype not in dtypes:
                bad(name, f"must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
            if tuple(t.shape) not in shapes:
                bad(name, f"must have shape {' or '.join(map(str, shapes))}, got "
                          f"{tuple(t.shape)}")
            return None if t.is_meta else t  # meta tensors hold no values to check

        scale = loaded("scale", (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                       [(out,)])
        if scale is not None and scale.numel():
            if not bool(torch.isfinite(scale).all()):
                bad("scale", f"holds {int((~torch.isfinite(scale)).sum())} NaN or Inf value(s)")
            if not bool((scale > 0).all()):
                bad("scale", f"holds {int((scale <= 0).sum())} value(s) <= 0 (min "
                             f"{float(scale.min())}); quantization scales are positive")
        cells = loaded("cells", (torch.uint8,), [(out, k, c)])
        if cells is not None and cells.numel() and int(cells.max()) > top:
            bad("cells", f"holds level {int(cells.max())} but a cell with bits_per_cell="
                         f"{cfg.bits_per_cell} holds levels in [0, {top}]")
        loaded("stuck", (torch.bool,), [(0,), (out, k, c)])
        index = loaded("sort_index", (torch.int64,), [(out, k)])
        if index is not None and index.numel():
            rows = torch.arange(k).expand(out, k)
            bad_rows = (index.cpu().sort(dim=1).values != rows).any(1).nonzero().flatten()
            if bad_rows.numel():
                bad("sort_index", f"is not a permutation of each row: row {int(bad_rows[0])} "
                                  f"(of {bad_rows.numel()} bad rows) is not a permutation of "
                                  f"[0, {k})")
        groups = self.moment_groups
        moment = loaded("input_moment", (torch.float32,), [(0,), (groups, k, k)])
        if moment is not None and moment.numel() and not bool(torch.isfinite(moment).all()):
            bad("input_moment", "holds NaN or Inf")
        tiles = layer_tiles(out, k, cfg)
        order = loaded("tile_order", (torch.int64,), [(0,), (tiles,)])
        if order is not None and order.numel() and not torch.equal(
                order.cpu().sort().values, torch.arange(tiles)):
            bad("tile_order", f"is not a permutation of the layer's {tiles} tiles")

    def _apply(self, fn, recurse=True):
        # `.to(dtype)` must not round the float32 scales (rule 2 computes in float32): keep
        # them float32, follow only the device.
        scale = self.scale
        in_sync = not self._weight_changed()
        super()._apply(fn, recurse)
        self.scale = scale.to(self.scale.device, torch.float32)
        self._eff_cache = None
        self._linear_cache = None
        if in_sync:
            self._mark_programmed()
        return self

    def crossbar_repr(self) -> str:
        cfg = self.config
        return (f"bits={cfg.weight_bits}, {cfg.encoding}, cell={cfg.bits_per_cell}b, "
                f"sort={cfg.sort}, xbar={cfg.rows}x{cfg.cols}")


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
        return F.linear(x, self.weight_for_forward(), self.bias)

    moment_groups = 1  # rule 21: one input second moment

    def input_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The rows (N, in_features) the crossbars read for input ``x`` (rule 21's moments)."""
        return x.reshape(-1, x.shape[-1])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self.crossbar_repr()}")


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
        return F.conv2d(x, w, self.bias, self.stride, padding, self.dilation, self.groups)

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


CROSSBAR_LAYERS = (CrossbarLinear, CrossbarConv2d)


def crossbar_layers(model: nn.Module):
    """(name, layer) of every crossbar layer, in module order (the schedule order, rule 6)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, CROSSBAR_LAYERS)]
