"""Python entry points of the ``torch.ops.crossbar_torch`` custom ops.

The kernels live in ``csrc/`` (CPU always, CUDA when built with it) and are registered with
``TORCH_LIBRARY``; this module loads the compiled library, registers the fake (meta) kernels so
the ops trace under ``torch.compile`` (``fakes``), and offers thin typed wrappers. ``reference`` holds the
plain-PyTorch implementation every kernel is tested against (tests only: production code never
calls it); ``analog_reference`` the same for ``analog_matmul`` (rules 17 and 18).
"""
from __future__ import annotations

import torch

DIFFERENTIAL, TWOS_COMPLEMENT, OFFSET = 0, 1, 2  # the ops' `encoding` argument
# Order of the counters returned by the program_layer op (then one entry per slice).
# set_pulses: the part of `pulses` on SET writes (reset pulses = pulses - set_pulses).
STAT_NAMES = ("writes", "sets", "resets", "pulses", "rows_programmed", "set_pulses")

try:
    from .. import _C  # noqa: F401  (registers torch.ops.crossbar_torch.*)
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "crossbar_torch._C is not built: run `pip install -e . --no-build-isolation` in the "
        f"checkout (see README.md). Original error: {exc}") from exc

_ops = torch.ops.crossbar_torch

from . import fakes  # noqa: E402,F401  (registers the fake kernels: needs STAT_NAMES above)


# ---- wrappers -------------------------------------------------------------------------------

def encode(q, weight_bits: int, bits_per_cell: int, encoding: int) -> torch.Tensor:
    return _ops.encode(q, weight_bits, bits_per_cell, encoding)


# ``check_values=False``: the caller vouches for the values (levels in range, the sort index a
# permutation, finite floats) because it checked them since they last changed: the kernel
# skips that pass, which on CUDA is a host synchronisation (crossbar layers, nn/modules/base.py).

def decode(cells, weight_bits: int, bits_per_cell: int, encoding: int,
           check_values: bool = True) -> torch.Tensor:
    return _ops.decode(cells, weight_bits, bits_per_cell, encoding, check_values)


def effective_weight(cells, index, scale, weight_bits: int, bits_per_cell: int,
                     encoding: int, check_values: bool = True) -> torch.Tensor:
    """Rule 9: float32 (out, K) ``W_eff`` in original order of the cells (uint8 (out, K, c),
    sorted order; on the host also a layer's packed ``cells`` buffer, (out, K, packed width)),
    the sort index (int64 (out, K)) and the scales (float32 (out,))."""
    return _ops.effective_weight(cells, index, scale, weight_bits, bits_per_cell, encoding,
                                 check_values)


def sort_and_encode(w, scale, index, weight_bits: int, bits_per_cell: int,
                    encoding: int, check_values: bool = True) -> torch.Tensor:
    return _ops.sort_and_encode(w, scale, index, weight_bits, bits_per_cell, encoding,
                                check_values)


def program_layer(cells, filter_index, order, pinned, state, written, stuck, cell_writes,
                  tile_offset: int, rows: int, cols: int, weight_bits: int, bits_per_cell: int,
                  encoding: int, stuck_initial: bool, count_cells: bool,
                  compensate_slices: int = 0, window: int = 0):
    """Program one layer's tiles; returns (effective cells, stats, tile order used).
    See reference.program_layer for the full contract."""
    return _ops.program_layer(cells, filter_index, order, pinned, state, written, stuck,
                              cell_writes, tile_offset, rows, cols, weight_bits, bits_per_cell,
                              encoding, stuck_initial, count_cells, compensate_slices, window)


def compensate(cells, held, old, weight_bits: int, bits_per_cell: int, encoding: int,
               compensate_slices: int, check_values: bool = True) -> torch.Tensor:
    """Rule 13 per weight (the training forward's programming): see reference.compensate."""
    return _ops.compensate(cells, held, old, weight_bits, bits_per_cell, encoding,
                           compensate_slices, check_values)


def feedback_quantize(target, u, held, levels, weight_bits: int, bits_per_cell: int,
                      encoding: int, stuck_slices: int, pred=None, sort_index=None,
                      write_penalty: float = 0.0, filter_weight=None,
                      running: bool = False):
    """Rule 21: error-feedback programming targets (int32 (out, K), original order) of a layer
    whose targets in scale units are ``target`` (float64 (out, K)), given ``u`` (float64
    (groups, K, K), each group's factor ``U D U^T`` of its damped input second moment: ``U``'s
    strict upper triangle, ``D`` on the diagonal; ``feedback.feedback_factor``) and the held
    cells ``held`` / their ``levels``: bool / uint8 (out, K, c) in original order, or, on the
    host, a layer's own ``stuck`` / ``cells`` buffers (uint8, packed as ``packing`` stores
    them, in sorted order: read through ``sort_index``); both empty: nothing held. Rule 23
    (``write_penalty`` > 0): ``pred`` (int64 (out,), -1: none) names the filter each is charged
    against, ``sort_index`` (int64 (out, K), the layer's sort index) the sorted positions;
    rule 25's ``filter_weight`` (float64 (out,), > 0) makes filter o pay
    ``write_penalty / filter_weight[o]``. ``running``: also the running targets (float64
    (out, K), each weight's when it was chosen). See feedback_reference.feedback_quantize."""
    none = dict(dtype=torch.int64, device=target.device)
    pred = torch.zeros(0, **none) if pred is None else pred
    sort_index = torch.zeros(0, 0, **none) if sort_index is None else sort_index
    q, t = _ops.feedback_quantize(target, u, held, levels, int(weight_bits), int(bits_per_cell),
                                  int(encoding), int(stuck_slices), pred, sort_index,
                                  float(write_penalty), filter_weight)
    return (q, t) if running else q


def feedback_factor(moment, damp: float) -> torch.Tensor:
    """Rule 21's factor (float64 (G, K, K)) of each group's input moment ``moment`` (float32
    (G, K, K), on the host): ``U`` unit upper triangular and ``D`` diagonal with ``U D U^T =
    H + lambda I`` (an input never seen, ``H[k, k] == 0``, made 1; ``lambda = damp * mean(diag
    H)``), ``U``'s strict upper triangle above ``D`` on the diagonal. LAPACK's factorisation on
    the calling thread's thread count (rule 21 computes it on one)."""
    return _ops.feedback_factor(moment, float(damp))


def feedback_refine(target, hs, q, pred, sort_index, weight_bits: int, bits_per_cell: int,
                    encoding: int, write_penalty: float, sweeps: int,
                    filter_weight=None, forms: bool = False):
    """Rule 24: ``sweeps`` refinement sweeps of rule 21's / 23's integers ``q`` (int32 (out, K),
    original order) for targets ``target`` (float64 (out, K)), the scaled moment ``hs`` (float64
    (groups, K, K)), rule 23's predecessors ``pred`` (int64 (out,), -1: none) and the sort index
    ``sort_index`` (int64 (out, K)); rule 25's ``filter_weight`` (float64 (out,), > 0) weighs
    filter o's error. Host only. See feedback_reference.feedback_refine.

    With ``forms``, also each filter's ``d . g`` (float64 (out,); empty with ``sweeps`` 0): ``d
    = q - target`` as the sweeps leave ``q`` and ``g`` the sweeps' running ``d Hs``, so ``d^T
    Hs d`` up to the running sum's rounding, which the reprogramming's warning reads."""
    q, f = _ops.feedback_refine(target, hs, q, pred, sort_index, int(weight_bits),
                                int(bits_per_cell), int(encoding), float(write_penalty),
                                int(sweeps), filter_weight)
    return (q, f) if forms else q


def chain_order(bits, start: int) -> torch.Tensor:
    """The nearest-neighbour chain over the rows of ``bits`` (int64 (out, W), each row a
    filter's cell bits packed in words) from row ``start``: the unvisited row at the smallest
    Hamming distance next, ties to the lowest row (int64 (out,)). CPU only (placement is chosen
    on the host, at conversion). See reference.chain_order."""
    return _ops.chain_order(bits, int(start))


def pack_levels(levels, bits_per_cell: int) -> torch.Tensor:
    """uint8 (..., c) levels -> uint8 (..., ceil(c / (8 // s))) packed (crossbar_torch/packing.py's
    layout; with s = 1 a nonzero level packs as 1, else a level's low s bits). CPU only (on a
    device, packing.py's torch ops)."""
    return _ops.pack_levels(levels, int(bits_per_cell))


def unpack_levels(packed, cells: int, bits_per_cell: int) -> torch.Tensor:
    """uint8 (..., ceil(c / (8 // s))) packed -> uint8 (..., c) levels (packing.py's layout).
    CPU only (on a device, packing.py's torch ops)."""
    return _ops.unpack_levels(packed, int(cells), int(bits_per_cell))


def sort_index(key) -> torch.Tensor:
    """Rule 4's order: per row of ``key`` (int32 (out, K): |q| or q), the positions in stable
    descending order of the keys, int64 (out, K). CPU only (the sort index is chosen on the
    host, at conversion); a counting sort over the levels. See reference.sort_index."""
    return _ops.sort_index(key)


def analog_matmul(x, g, sort_index, cell_weight, adc_steps, groups: int, rows: int,
                  input_bits: int, input_bits_per_cycle: int, input_scale: float, adc_bits: int,
                  g0: float, encoding_offset: float, signed_weights: bool,
                  check_values: bool = True):
    """A crossbar layer's output through the DAC and the ADC (docs/semantics.md rules 17, 18);
    returns ``(acc (N, out) float64, pmax (c,) float64)``. See analog_reference.analog_matmul
    for the full contract."""
    return _ops.analog_matmul(x, g, sort_index, cell_weight, adc_steps, int(groups), int(rows),
                              int(input_bits), int(input_bits_per_cycle), float(input_scale),
                              int(adc_bits), float(g0), float(encoding_offset),
                              bool(signed_weights), bool(check_values))
