"""What every crossbar layer shares (``CrossbarMixin``): its buffers, its programming state, the
weights it computes with, its analog periphery and its state dict.

Each layer holds, as buffers that round-trip through ``state_dict``:

* ``scale``      float32 (out,)       quantization scale per row (fixed after conversion)
* ``sort_index`` int16 (out, K)       position k' of the sorted filter holds weight index[o, k']
                                      (int32 when K > 32768: the narrowest integer type that
                                      holds K - 1; see "Stored formats" below)
* ``cells``      uint8 (out, K, P)    the cell levels the crossbars hold (sorted order), i.e. the
                                      conductance states after programming (docs/semantics.md
                                      rule 9), packed: 8 // b levels of b-bit cells a byte,
                                      P = ceil(c / (8 // b)) (``crossbar_torch.packing``);
                                      ``held_cells()`` unpacks them to uint8 (out, K, c)
* ``stuck``      uint8 (out, K, Q)    cells that are stuck, packed 8 a byte, Q = ceil(c / 8)
                                      (empty when the config has no stucking); ``stuck_cells()``
                                      unpacks them to bool (out, K, c)
* ``filter_index`` int64 (nb*F,)      filter placement (rule 11): the filter in column block j,
                                      slot f is filter_index[j*F + f]; -1 marks an unused slot
* ``tile_order`` int64 (tiles,)       the order the layer's tiles are programmed in (rule 12;
                                      chosen by the first programming, replayed afterwards)

and the latent float ``weight`` stays a parameter for fine-tuning.

Eval mode computes with the effective weights decoded from ``cells`` (cached once per
programming, then the native GEMM / conv). Train mode simulates programming the *current* latent
weight (quantize with the fixed scales, gather through the fixed sort index, encode, keep the
stuck cells' levels, compensate (rule 13) when configured, decode, un-sort; a calibrated rule-21
layer computes with the cells it holds, its feedback being a sequential solve) and passes the
gradient straight through to the latent weight. Semantics: docs/semantics.md.

Stored formats (docs/checkpoints.md): the sort index in the narrowest integer type holding K - 1
(widened per call: ``long_sort_index``), cells and stuck flags packed (unpacked per layer).
"""
from __future__ import annotations

import warnings
import weakref

import torch

from .. import analog
from ... import ops
from ...config import COUNTING_FIELDS, CrossbarConfig
from ...errors import ModelStateError
from ...mapping import check_filter_index, filter_index, natural_filter_index
from ...packing import pack_levels, packed_width, unpack_levels, unpack_mask
from ...quantization import index_dtype, quantize, sort_index
from .stamps import ProgrammedWeight, no_object, same_stamp
from .state import check_loaded_buffers, feedback_active


# What a crossbar layer keeps beside the parameters of the layer it replaced.
CROSSBAR_BUFFERS = ("scale", "sort_index", "cells", "stuck", "filter_index", "tile_order",
                    "input_range", "adc_range", "prog_eps", "drift_nu", "input_moment",
                    "output_gain", "_extra_state")
# Rules 17 to 21 and 26: empty unless the periphery (or rule 21's input moment E[x x^T], float32
# (groups, K, K), or rule 26's output gains, float64 (out,)) needs them; their size depends on
# the config and calibration, and state dicts from before they existed load without them.
ANALOG_BUFFERS = {"input_range": torch.float32, "adc_range": torch.float64,
                  "prog_eps": torch.float32, "drift_nu": torch.float32,
                  "input_moment": torch.float32, "output_gain": torch.float64}


def k_of(layer) -> int:
    """K of a crossbar layer (the columns of its (out, K) weight matrix)."""
    return layer.cells.shape[1]


class CrossbarMixin(ProgrammedWeight):
    """What CrossbarLinear and CrossbarConv2d share: buffers, programming state, weights."""

    config: CrossbarConfig
    shares_input_rows = False  # rule 21: rows = its input's rows, shareable (not im2col rows)

    def long_sort_index(self) -> torch.Tensor:
        """The sort index as int64 (ops, ``scatter``, ``gather``): a transient copy, per call."""
        return self.sort_index.long()

    def held_cells(self) -> torch.Tensor:
        """The cell levels the crossbars hold, uint8 (out, K, c) in sorted order: the stored
        packed ``cells`` unpacked (a transient copy; writing to it changes nothing)."""
        cfg = self.config
        return unpack_levels(self.cells, cfg.cells_per_weight, cfg.bits_per_cell)

    def stuck_cells(self) -> torch.Tensor:
        """The stuck cells, bool (out, K, c), or an empty bool tensor when none are (no
        stucking, or never programmed): the stored packed ``stuck`` unpacked."""
        if not self.stuck.numel():
            return torch.zeros(0, dtype=torch.bool, device=self.stuck.device)
        return unpack_mask(self.stuck, self.config.cells_per_weight)

    def _init_crossbar(self, config: CrossbarConfig, out_features: int, k: int) -> None:
        self.config = config
        c, dev = config.cells_per_weight, self.weight.device  # the buffers live beside weight
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=dev))
        self.register_buffer("sort_index", torch.arange(k, dtype=index_dtype(k), device=dev)
                             .expand(out_features, k).contiguous())
        width = packed_width(c, config.bits_per_cell)
        self.register_buffer("cells", torch.zeros(out_features, k, width, dtype=torch.uint8,
                                                  device=dev))
        self.register_buffer("stuck", torch.zeros(0, dtype=torch.uint8, device=dev))
        self.register_buffer("filter_index", natural_filter_index(out_features, config).to(dev))
        self.register_buffer("tile_order", torch.zeros(0, dtype=torch.int64, device=dev))
        for name, dtype in ANALOG_BUFFERS.items():
            self.register_buffer(name, torch.zeros(0, dtype=dtype, device=dev))
        self.layer_number, self.layer_name = 0, type(self).__name__  # set by convert
        self._forward_count = 0  # read-noise draws (rule 19)
        self._eff_cache = None
        self._linear_cache = None
        self._programmed_version = None
        self._programmed_digest = None
        self._programmed = False  # cells set by programming or loaded (refuse to run before)
        self._verified = {}  # op -> stamp of the held tensors it last checked (_check_now)
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
        index = sort_index(q, self.config)
        self.sort_index = index.to(self.sort_index.device, index_dtype(q.shape[1]))
        self.filter_index = filter_index(q, self.config, index).to(self.filter_index.device)
        if encode:
            self.set_cells(self.target_cells(), None)

    def target_cells(self, trusted: bool = False, check_values: bool = True) -> torch.Tensor:
        """Cell levels that programming the current latent weight asks for (sorted order).
        Programming checks every value (NaN / Inf weights refused) in its first pass; the
        training forward (``trusted``) checks the scale and sort index once per change of them
        and leaves the latent weight to the trainer's divergence check (no host sync)."""
        w = self.matrix_weight().detach().to(torch.float32).contiguous()
        cfg = self.config
        check = check_values and (not trusted or self._check_now("sort_and_encode"))
        cells = ops.sort_and_encode(w, self.scale, self.long_sort_index(), cfg.weight_bits,
                                    cfg.bits_per_cell, cfg.encoding_id, check_values=check)
        if trusted and check:
            self._checked("sort_and_encode")
        return cells

    def set_cells(self, cells: torch.Tensor, stuck: torch.Tensor | None,
                  tile_order: torch.Tensor | None = None) -> None:
        """Store what the crossbars hold after programming (called by the programmer), and the
        tile order the programming used (replayed by later programmings). ``stuck``: packed
        flags (``packing.pack_mask``) or None."""
        self.cells = pack_levels(cells, self.config.bits_per_cell).to(self.cells.device)
        self.stuck = (stuck.to(self.cells.device) if stuck is not None
                      else torch.zeros(0, dtype=torch.uint8, device=self.cells.device))
        if tile_order is not None:
            self.tile_order = tile_order.to(self.tile_order.device, torch.int64).contiguous()
        self._eff_cache = None
        self._linear_cache = None
        self._programmed = True
        self._mark_programmed()

    def _check_programmed(self) -> None:
        if not self._programmed:
            raise ModelStateError(
                f"{type(self).__name__} {self.layer_name!r}: its crossbars were never programmed "
                f"(built directly, its cells are empty); make it with {type(self).__name__}."
                f"{'from_linear' if hasattr(self, 'in_features') else 'from_conv'}(...) or "
                "crossbar_torch.convert(model), or load a state dict into it")

    def __getstate__(self):
        # pickling (torch.save of a whole module, deepcopy): weak references do not pickle and
        # the caches are derived; a stamp's object becomes "another object", so the first
        # check after unpickling compares the digest
        state = super().__getstate__().copy()
        state["_eff_cache"] = state["_linear_cache"] = state["_output_error"] = None
        state["_verified"] = {}
        if state.get("_programmed_version") is not None:
            state["_programmed_version"] = (no_object, state["_programmed_version"][1])
        return state

    # ---- caches of what the held cells give, stamped with the tensors they derive from ------
    def derived_stamp(self) -> tuple:
        """The identity and version of every tensor the effective weights and the periphery
        derive from (cells, scale, sort_index, stuck, the programming error and drift, the
        calibrated ranges): a cache keyed by it is stale as soon as one of them is replaced or
        edited in place."""
        return tuple((weakref.ref(b), b._version) for b in
                     (self.cells, self.scale, self.sort_index, self.stuck, self.prog_eps,
                      self.drift_nu, self.input_range, self.adc_range)
                     if not b.is_inference()) + (self.weight.dtype,)

    def cached(self, slot: str, compute):
        """``compute()``, kept in ``slot`` until :meth:`derived_stamp` changes."""
        stamp = self.derived_stamp()
        hit = getattr(self, slot)
        if hit is not None and same_stamp(hit[0], stamp):
            return hit[1]
        value = compute()
        setattr(self, slot, (stamp, value))
        return value

    # ---- value checks of the held tensors: once per change, not per forward ----------------
    def _check_now(self, op: str) -> bool:
        """Whether ``op`` must check the values of the held tensors on this call: on its first
        call after cells, scale, sort index, stuck, prog_eps or drift_nu were replaced or edited
        in place (the stamp of the caches), not on the calls after, so that a forward makes no
        host synchronisation (issue 19). Inside a compiled graph never: the values were
        checked at conversion or load, and the first eager call after an edit checks them."""
        if torch.compiler.is_compiling():
            return False
        seen = self._verified.get(op)
        return seen is None or not same_stamp(seen, self.derived_stamp())

    def _checked(self, op: str) -> None:
        """``op`` checked the held tensors as they are now (call after it returned)."""
        self._verified[op] = self.derived_stamp()

    def held_op(self, op: str, fn, *args):
        """``fn(*args, check_values=...)`` for an op reading the held tensors, checking their
        values only when :meth:`_check_now` says so."""
        check = self._check_now(op)
        out = fn(*args, check_values=check)
        if check:
            self._checked(op)
        return out

    # ---- effective weights --------------------------------------------------------------------
    def _decode(self, cells: torch.Tensor) -> torch.Tensor:
        # `cells` are the held ones or come from the kernels (in range by construction): the
        # values to check are the held sort index and scale
        cfg = self.config
        w = self.held_op("effective_weight", ops.effective_weight, cells, self.long_sort_index(),
                         self.scale, cfg.weight_bits, cfg.bits_per_cell, cfg.encoding_id)
        return w.reshape(self._weight_shape()).to(self.weight.dtype)

    def effective_weight(self) -> torch.Tensor:
        """The weight the crossbars compute with: decoded held cells, un-sorted, times scale."""
        if torch.compiler.is_compiling():  # traced: the decode is part of the graph
            return self._decode(self.held_cells())
        # the host decodes the packed buffer as stored (a device unpacks it first)
        cells = self.cells if self.cells.device.type == "cpu" else self.held_cells()
        with torch.no_grad():
            return self.cached("_eff_cache", lambda: self._decode(cells))

    def note_output_error(self, energy: float) -> None:
        """Keep ``tr(E H E^T)`` as rule 21's programming knew it (its residuals), for the
        warning, until a tensor it derives from (cells, scale, sort index, stuck cells, latent
        weight, input moment) is replaced or changed."""
        self._output_error = (energy, self._output_error_stamp())

    def noted_output_error(self) -> float | None:
        """The energy of :meth:`note_output_error` while it holds, else None."""
        hit = getattr(self, "_output_error", None)
        return hit[0] if hit is not None and same_stamp(hit[1], self._output_error_stamp()) \
            else None

    def _output_error_stamp(self) -> tuple:
        return self.derived_stamp() + tuple((weakref.ref(t), t._version) for t in (
            self.weight, self.input_moment) if not t.is_inference())

    def effective_q(self) -> torch.Tensor:
        """Integer effective weights q_eff (out, K) in the original order (rule 9)."""
        cfg = self.config
        q_sorted = ops.decode(self.held_cells(), cfg.weight_bits, cfg.bits_per_cell,
                              cfg.encoding_id)
        q = torch.empty_like(q_sorted)
        q.scatter_(1, self.long_sort_index(), q_sorted)
        return q

    def simulated_cells(self) -> torch.Tensor:
        """The cells programming the current latent weight would leave (sorted order); for a
        rule-21 layer, the cells its last programming left (see ``feedback_active``)."""
        cfg = self.config.for_layer(self.layer_name)  # rule 22: this layer's policy
        if feedback_active(self, cfg):  # a sequential solve per filter: neither cheap nor
            return self.held_cells()    # differentiable; exact while the latent is unchanged
        target = self.target_cells(trusted=True)
        if self.stuck.numel():
            # what programming would leave: the stuck cells keep their levels, and with rule 13
            # the free cells compensate (the write tie-break measured against the held cells)
            target = self.held_op("compensate", ops.compensate, target, self.stuck_cells(),
                                  self.held_cells(), cfg.weight_bits, cfg.bits_per_cell,
                                  cfg.encoding_id,
                                  cfg.stuck_slices if cfg.compensate else 0)
        return target

    def simulated_weight(self, cells: torch.Tensor | None = None) -> torch.Tensor:
        """Train mode: effective weight of the current latent weight with the stuck cells kept,
        the quantizer passed straight through (d/d latent = d/d effective weight)."""
        if cells is None and feedback_active(self, self.config.for_layer(self.layer_name)):
            w_eff = self.effective_weight()  # the held cells' decode, cached per programming
        else:
            w_eff = self._decode(self.simulated_cells() if cells is None else cells)
        # only the quantizer is skipped by the gradient (StdConv2d-style standardization stays
        # differentiable); w - w.detach() is exactly 0 for finite w: the value is w_eff bit for
        # bit (train and eval compute the same numbers) while d/dw is the identity
        w = self.matrix_weight().reshape(self._weight_shape())
        return w_eff.detach() + (w - w.detach())

    def weight_for_forward(self) -> torch.Tensor:
        if analog.is_latent():  # rule 26 measures the float model
            return self.matrix_weight().reshape(self._weight_shape())
        self._check_programmed()
        if self.training:  # simulate programming the current latent weight (fine-tuning)
            return self.simulated_weight()
        self._warn_if_stale()
        return self.effective_weight()

    def train(self, mode: bool = True):
        # switching to eval is when a changed latent weight matters (eager, also when compiled)
        if not mode and self._programmed:
            self._warn_if_stale()
        return super().train(mode)

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
        if analog.is_latent():  # rule 26 measures the float model: no periphery
            return apply_fn(x, self.matrix_weight().reshape(self._weight_shape()))
        self._check_programmed()
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
        # the device's values, not its preset name or path: the state dict loads anywhere
        return {"crossbar_config": self.config.with_device_values().to_dict()}

    def set_extra_state(self, state) -> None:
        pass  # checked (before the buffers) in _load_from_state_dict

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        layer = prefix.rstrip('.') or '<root>'
        key = prefix + "_extra_state"
        if key in state_dict:
            # fields a saved config predates hold their defaults (rules 11 to 13 came later);
            # the counting fields are the loaded model's own
            saved = dict(state_dict[key].get("crossbar_config", {}))
            diff = {k: (theirs, mine) for k, (mine, theirs) in
                    self.config.diff(saved, ignore=COUNTING_FIELDS).items()}
            if diff:
                raise RuntimeError(
                    f"crossbar layer {layer}: the state dict was made "
                    f"with a different CrossbarConfig (field: (saved, this model)) {diff}; "
                    "convert the model with the saved config before loading")
        check_loaded_buffers(self, state_dict, prefix, layer)
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
        ikey = prefix + "sort_index"
        if ikey in state_dict and not state_dict[ikey].is_meta:
            # checked above (a permutation of [0, K)), so narrowing is exact
            state_dict[ikey] = state_dict[ikey].to(index_dtype(k_of(self)))
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
        self._programmed = self._programmed or prefix + "cells" in state_dict
        self._mark_programmed()

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
