"""Fake (meta) kernels of the ``torch.ops.crossbar_torch`` custom ops: shapes and dtypes only,
so the ops trace under ``torch.compile`` and run on meta tensors. Registered when
``crossbar_torch.ops`` loads the compiled library (its ``__init__`` imports this module).
"""
from __future__ import annotations

import math

import torch

from ..encoding import cells_for, packed_width, slices_for, slot_bits
from . import STAT_NAMES

# They check what the metadata tells (format, dtypes, one device, ranks, sizes) with the C++
# kernels' messages; the checks of values (levels, index permutations, finiteness) need data.
# The dispatcher also routes a call mixing meta and real tensors here: refused as a device
# mismatch rather than answered with an uninitialized tensor.

def _check_format(op, weight_bits, bits_per_cell, encoding):
    torch._check(2 <= weight_bits <= 16,
                 lambda: f"crossbar_torch.{op}: weight_bits must be in [2, 16], got {weight_bits}")
    torch._check(1 <= bits_per_cell <= 8,
                 lambda: f"crossbar_torch.{op}: bits_per_cell must be in [1, 8], got "
                         f"{bits_per_cell}")
    torch._check(0 <= encoding <= 2,
                 lambda: f"crossbar_torch.{op}: encoding must be 0 (differential), 1 "
                         f"(twos_complement) or 2 (offset), got {encoding}")
    return cells_for(weight_bits, bits_per_cell, encoding)


_DTYPE_NAMES = {torch.uint8: "Byte", torch.int32: "Int", torch.int64: "Long",
                torch.float32: "Float", torch.float64: "Double",
                torch.bool: "Bool"}  # as the C++ checks name them


def _dtype_name(dtype):
    return _DTYPE_NAMES.get(dtype, str(dtype))


def _check_tensors(op, first, specs):
    """specs: (name, tensor, dtype, rank or None); devices compared with the first tensor."""
    ref_name, ref = first
    for name, t, dtype, rank in specs:
        torch._check(t.dtype == dtype,
                     lambda: f"crossbar_torch.{op}: {name} must be {_dtype_name(dtype)}, got "
                             f"{_dtype_name(t.dtype)}")
        torch._check(t.device == ref.device,
                     lambda: f"crossbar_torch.{op}: {name} is on {t.device} but {ref_name} is on "
                             f"{ref.device} (all tensors must be on the same device)")
        if rank is not None:
            torch._check(t.dim() == rank,
                         lambda: f"crossbar_torch.{op}: {name} must have {rank} dimensions, got "
                                 f"shape {tuple(t.shape)}")


def _check_size(op, name, t, dim, expected, what):
    torch._check(t.shape[dim] == expected,
                 lambda: f"crossbar_torch.{op}: {name}.size({dim}) must equal {what} = "
                         f"{expected}, got {t.shape[dim]} (shape {tuple(t.shape)})")


@torch.library.register_fake("crossbar_torch::encode")
def _encode_fake(q, weight_bits, bits_per_cell, encoding):
    c = _check_format("encode", weight_bits, bits_per_cell, encoding)
    _check_tensors("encode", ("q", q), [("q", q, torch.int32, None)])
    return q.new_empty((*q.shape, c), dtype=torch.uint8)


@torch.library.register_fake("crossbar_torch::decode")
def _decode_fake(cells, weight_bits, bits_per_cell, encoding, check_values=True):
    c = _check_format("decode", weight_bits, bits_per_cell, encoding)
    _check_tensors("decode", ("cells", cells), [("cells", cells, torch.uint8, None)])
    torch._check(cells.dim() >= 1,
                 lambda: "crossbar_torch.decode: cells must have a trailing cell axis")
    _check_size("decode", "cells", cells, cells.dim() - 1, c, "cells per weight c")
    return cells.new_empty(cells.shape[:-1], dtype=torch.int32)


@torch.library.register_fake("crossbar_torch::effective_weight")
def _effective_weight_fake(cells, index, scale, weight_bits, bits_per_cell, encoding,
                           check_values=True):
    op = "effective_weight"
    c = _check_format(op, weight_bits, bits_per_cell, encoding)
    _check_tensors(op, ("cells", cells), [("cells", cells, torch.uint8, 3),
                                          ("index", index, torch.int64, 2),
                                          ("scale", scale, torch.float32, 1)])
    if cells.device.type != "cpu" or cells.shape[2] != packed_width(c, bits_per_cell):
        # a layer's packed buffer is decoded on the host only
        _check_size(op, "cells", cells, 2, c, "cells per weight c")
    _check_size(op, "index", index, 0, cells.shape[0], "out = cells.size(0)")
    _check_size(op, "index", index, 1, cells.shape[1], "K = cells.size(1)")
    _check_size(op, "scale", scale, 0, cells.shape[0], "out = cells.size(0)")
    return cells.new_empty(cells.shape[:-1], dtype=torch.float32)


@torch.library.register_fake("crossbar_torch::sort_and_encode")
def _sort_and_encode_fake(w, scale, index, weight_bits, bits_per_cell, encoding,
                          check_values=True):
    op = "sort_and_encode"
    c = _check_format(op, weight_bits, bits_per_cell, encoding)
    _check_tensors(op, ("w", w), [("w", w, torch.float32, 2), ("scale", scale, torch.float32, 1),
                                  ("index", index, torch.int64, 2)])
    _check_size(op, "scale", scale, 0, w.shape[0], "out = w.size(0)")
    _check_size(op, "index", index, 0, w.shape[0], "out = w.size(0)")
    _check_size(op, "index", index, 1, w.shape[1], "K = w.size(1)")
    return w.new_empty((*index.shape, c), dtype=torch.uint8)


@torch.library.register_fake("crossbar_torch::program_layer")
def _program_layer_fake(cells, filter_index, order, pinned, state, written, stuck, cell_writes,
                        tile_offset, rows, cols, weight_bits, bits_per_cell, encoding,
                        stuck_initial, count_cells, compensate_slices, window):
    op = "program_layer"
    torch._check(1 <= rows <= 1 << 20,
                 lambda: f"crossbar_torch.{op}: rows must be in [1, {1 << 20}], got {rows}")
    torch._check(1 <= cols <= 1 << 20,
                 lambda: f"crossbar_torch.{op}: cols must be in [1, {1 << 20}], got {cols}")
    c = _check_format(op, weight_bits, bits_per_cell, encoding)
    torch._check(c <= cols, lambda: f"crossbar_torch.{op}: cells per weight c = {c} must be <= "
                                    f"cols = {cols} (at least one filter per crossbar)")
    _check_tensors(op, ("cells", cells), [
        ("cells", cells, torch.uint8, 3), ("filter_index", filter_index, torch.int64, 1),
        ("order", order, torch.int64, 1), ("pinned", pinned, torch.uint8, None),
        ("state", state, torch.int64, 4), ("written", written, torch.int64, 3),
        ("stuck", stuck, torch.int64, 3), ("cell_writes", cell_writes, torch.int32, None)])
    _check_size(op, "cells", cells, 2, c, "cells per weight c")
    torch._check(pinned.numel() == 0 or pinned.shape == cells.shape,
                 lambda: f"crossbar_torch.{op}: pinned must be empty or have the shape of cells "
                         f"{tuple(cells.shape)}, got {tuple(pinned.shape)}")
    words = -(-cols // 64)
    pool = state.shape[0]
    _check_size(op, "state", state, 1, rows, "rows")
    _check_size(op, "state", state, 2, bits_per_cell, "bits_per_cell (planes)")
    _check_size(op, "state", state, 3, words, "words = ceil(cols / 64)")
    for name, t in (("written", written), ("stuck", stuck)):
        _check_size(op, name, t, 0, pool, "pool = state.size(0)")
        _check_size(op, name, t, 1, rows, "rows")
        _check_size(op, name, t, 2, words, "words = ceil(cols / 64)")
    out, k = cells.shape[0], cells.shape[1]
    F = cols // c
    tiles = (-(-out // F)) * (-(-k // rows)) if out and k else 0
    return (torch.empty_like(cells),
            cells.new_empty((len(STAT_NAMES) + slices_for(weight_bits, bits_per_cell, encoding),),
                            dtype=torch.int64),
            cells.new_empty((tiles,), dtype=torch.int64))


@torch.library.register_fake("crossbar_torch::compensate")
def _compensate_fake(cells, held, old, weight_bits, bits_per_cell, encoding, compensate_slices,
                     check_values=True):
    op = "compensate"
    c = _check_format(op, weight_bits, bits_per_cell, encoding)
    _check_tensors(op, ("cells", cells), [("cells", cells, torch.uint8, None),
                                          ("held", held, torch.bool, None),
                                          ("old", old, torch.uint8, None)])
    torch._check(cells.dim() >= 1,
                 lambda: f"crossbar_torch.{op}: cells must have a trailing cell axis")
    _check_size(op, "cells", cells, cells.dim() - 1, c, "cells per weight c")
    torch._check(held.shape == cells.shape and old.shape == cells.shape,
                 lambda: f"crossbar_torch.{op}: held {tuple(held.shape)} and old "
                         f"{tuple(old.shape)} must have the shape of cells {tuple(cells.shape)}")
    return torch.empty_like(cells)


@torch.library.register_fake("crossbar_torch::feedback_quantize")
def _feedback_quantize_fake(target, u, held, levels, weight_bits, bits_per_cell, encoding,
                            stuck_slices, pred, sort_index, write_penalty=0.0, filter_weight=None):
    op = "feedback_quantize"
    c = _check_format(op, weight_bits, bits_per_cell, encoding)
    packed = held.dtype == torch.uint8  # a layer's own buffers, packed, in sorted order
    _check_tensors(op, ("target", target), [("target", target, torch.float64, 2),
                                            ("u", u, torch.float64, 3),
                                            ("held", held, torch.uint8 if packed else torch.bool,
                                             None),
                                            ("levels", levels, torch.uint8, None)])
    out, k = target.shape
    torch._check(u.shape[0] >= 1 and out % u.shape[0] == 0,
                 lambda: f"crossbar_torch.{op}: out = {out} must be a multiple of the groups "
                         f"of u = {u.shape[0]}")
    _check_size(op, "u", u, 1, k, "K = target.size(1)")
    _check_size(op, "u", u, 2, k, "K = target.size(1)")
    shape = (out, k, packed_width(c, 1)) if packed else (out, k, c)
    torch._check(held.numel() == 0 or tuple(held.shape) == shape,
                 lambda: f"crossbar_torch.{op}: held must be empty or {shape}, got "
                         f"{tuple(held.shape)}")
    shape = (out, k, packed_width(c, bits_per_cell)) if packed else tuple(held.shape)
    torch._check(held.numel() == 0 and levels.numel() == 0 or tuple(levels.shape) == shape,
                 lambda: f"crossbar_torch.{op}: levels {tuple(levels.shape)} must be "
                         f"{shape} with held {tuple(held.shape)}")
    _check_filter_weight(op, filter_weight, out)
    return target.new_empty((out, k), dtype=torch.int32), torch.empty_like(target)


def _check_filter_weight(op, a, out):
    """Rule 25's weights: absent, or float64 (out,) (their values are the kernels' to check)."""
    torch._check(a is None or (a.dtype == torch.float64 and tuple(a.shape) == (out,)), lambda: (
        f"crossbar_torch.{op}: filter_weight must be float64 (out,) = ({out},), got {a.dtype} "
        f"{tuple(a.shape)}"))


@torch.library.register_fake("crossbar_torch::feedback_factor")
def _feedback_factor_fake(moment, damp):
    op = "feedback_factor"
    _check_tensors(op, ("moment", moment), [("moment", moment, torch.float32, 3)])
    _check_size(op, "moment", moment, 2, moment.shape[1], "K = moment.size(1)")
    return moment.new_empty(moment.shape, dtype=torch.float64)


@torch.library.register_fake("crossbar_torch::feedback_refine")
def _feedback_refine_fake(target, hs, q, pred, sort_index, weight_bits, bits_per_cell, encoding,
                          write_penalty, sweeps, filter_weight=None):
    op = "feedback_refine"
    _check_format(op, weight_bits, bits_per_cell, encoding)
    _check_tensors(op, ("target", target), [("target", target, torch.float64, 2),
                                            ("hs", hs, torch.float64, 3),
                                            ("q", q, torch.int32, 2),
                                            ("pred", pred, torch.int64, 1),
                                            ("sort_index", sort_index, torch.int64, 2)])
    out, k = target.shape
    torch._check(hs.shape[0] >= 1 and out % hs.shape[0] == 0,
                 lambda: f"crossbar_torch.{op}: out = {out} must be a multiple of the groups "
                         f"of hs = {hs.shape[0]}")
    _check_size(op, "hs", hs, 1, k, "K = target.size(1)")
    _check_size(op, "hs", hs, 2, k, "K = target.size(1)")
    torch._check(tuple(q.shape) == (out, k) and tuple(sort_index.shape) == (out, k)
                 and tuple(pred.shape) == (out,),
                 lambda: f"crossbar_torch.{op}: q {tuple(q.shape)}, sort_index "
                         f"{tuple(sort_index.shape)} must be (out, K) = {(out, k)} and pred "
                         f"{tuple(pred.shape)} (out,)")
    _check_filter_weight(op, filter_weight, out)
    return torch.empty_like(q), target.new_empty((out if sweeps else 0,))


@torch.library.register_fake("crossbar_torch::chain_order")
def _chain_order_fake(bits, start):
    _check_tensors("chain_order", ("bits", bits), [("bits", bits, torch.int64, 2)])
    return bits.new_empty((bits.shape[0],), dtype=torch.int64)


@torch.library.register_fake("crossbar_torch::sort_index")
def _sort_index_fake(key):
    _check_tensors("sort_index", ("key", key), [("key", key, torch.int32, 2)])
    return key.new_empty(tuple(key.shape), dtype=torch.int64)


def _check_bits_per_cell(op, bits_per_cell):
    torch._check(1 <= bits_per_cell <= 8,
                 lambda: f"crossbar_torch.{op}: bits_per_cell must be in [1, 8], got "
                         f"{bits_per_cell}")


@torch.library.register_fake("crossbar_torch::pack_levels")
def _pack_levels_fake(levels, bits_per_cell):
    _check_bits_per_cell("pack_levels", bits_per_cell)
    _check_tensors("pack_levels", ("levels", levels), [("levels", levels, torch.uint8, None)])
    torch._check(levels.dim() >= 1,
                 lambda: "crossbar_torch.pack_levels: levels must have a trailing cell axis")
    return levels.new_empty((*levels.shape[:-1], packed_width(levels.shape[-1], bits_per_cell)))


@torch.library.register_fake("crossbar_torch::unpack_levels")
def _unpack_levels_fake(packed, cells, bits_per_cell):
    _check_bits_per_cell("unpack_levels", bits_per_cell)
    torch._check(cells >= 0, lambda: f"crossbar_torch.unpack_levels: cells must be >= 0, got "
                                     f"{cells}")
    _check_tensors("unpack_levels", ("packed", packed), [("packed", packed, torch.uint8, None)])
    torch._check(packed.dim() >= 1,
                 lambda: "crossbar_torch.unpack_levels: packed must have a trailing byte axis")
    width = packed_width(cells, bits_per_cell)
    torch._check(packed.shape[-1] == width or (slot_bits(bits_per_cell) == 8
                                               and packed.shape[-1] >= cells),
                 lambda: f"crossbar_torch.unpack_levels: packed.size(-1) must be {width} for "
                         f"{cells} cells of {bits_per_cell} bit(s), got {packed.shape[-1]}")
    return packed.new_empty((*packed.shape[:-1], cells))


@torch.library.register_fake("crossbar_torch::analog_matmul")
def _analog_matmul_fake(x, g, sort_index, cell_weight, adc_steps, groups, rows, input_bits,
                        input_bits_per_cycle, input_scale, adc_bits, g0, encoding_offset,
                        signed_weights, check_values=True):
    op = "analog_matmul"
    torch._check(groups >= 1, lambda: f"crossbar_torch.{op}: groups must be >= 1, got {groups}")
    torch._check(rows >= 1, lambda: f"crossbar_torch.{op}: rows must be >= 1, got {rows}")
    torch._check(0 <= input_bits <= 16,
                 lambda: f"crossbar_torch.{op}: input_bits must be in [0, 16] (0: ideal DAC), "
                         f"got {input_bits}")
    torch._check(1 <= input_bits_per_cycle <= 16,
                 lambda: f"crossbar_torch.{op}: input_bits_per_cycle must be in [1, 16], got "
                         f"{input_bits_per_cycle}")
    torch._check(input_bits == 0 or (math.isfinite(input_scale) and input_scale > 0
                                     and _f32_positive(input_scale)),
                 lambda: f"crossbar_torch.{op}: input_scale must be finite and > 0 (in float32, "
                         f"where the inputs are quantized) when input_bits > 0, got "
                         f"{input_scale}")
    torch._check(0 <= adc_bits <= 24,
                 lambda: f"crossbar_torch.{op}: adc_bits must be in [0, 24] (0: no ADC), got "
                         f"{adc_bits}")
    torch._check(math.isfinite(g0) and g0 >= 0,
                 lambda: f"crossbar_torch.{op}: g0 must be finite and >= 0, got {g0}")
    torch._check(math.isfinite(encoding_offset),
                 lambda: f"crossbar_torch.{op}: encoding_offset must be finite, got "
                         f"{encoding_offset}")
    _check_tensors(op, ("x", x), [
        ("x", x, torch.float32, 2), ("g", g, torch.float32, 3),
        ("sort_index", sort_index, torch.int64, 2), ("cell_weight", cell_weight, torch.float64, 1),
        ("adc_steps", adc_steps, torch.float64, 1)])
    out, c, k = g.shape
    torch._check(out % groups == 0,
                 lambda: f"crossbar_torch.{op}: groups = {groups} must divide out = g.size(0) = "
                         f"{out}")
    _check_size(op, "x", x, 1, groups * k, "groups * K = groups * g.size(2)")
    _check_size(op, "sort_index", sort_index, 0, out, "out = g.size(0)")
    _check_size(op, "sort_index", sort_index, 1, k, "K = g.size(2)")
    _check_size(op, "cell_weight", cell_weight, 0, c, "c = g.size(1)")
    _check_size(op, "adc_steps", adc_steps, 0, c, "c = g.size(1)")
    if signed_weights:
        torch._check(c == 1, lambda: f"crossbar_torch.{op}: signed_weights needs one cell per "
                                     f"weight (g.size(1) = c = 1, the signed weight), got c = {c}")
        torch._check(input_bits > 0, lambda: f"crossbar_torch.{op}: signed_weights needs "
                                             f"quantized inputs (input_bits > 0), got "
                                             f"input_bits = 0")
    return (x.new_empty((x.shape[0], out), dtype=torch.float64),
            x.new_empty((c,), dtype=torch.float64))


def _f32_positive(v):
    """v > 0 and finite once rounded to float32 (the scale the inputs are divided by)."""
    v32 = float(torch.tensor(v, dtype=torch.float32))
    return math.isfinite(v32) and v32 > 0


@torch.library.register_fake("crossbar_torch::one_thread_each")
def _one_thread_each_fake(a, b, bias, linear, stacked=False):
    op = "one_thread_each"
    torch._check(len(a) == len(b),
                 lambda: f"crossbar_torch.{op}: a and b must hold as many tensors, got {len(a)} "
                         f"and {len(b)}")
    torch._check(bias is None or linear,
                 lambda: f"crossbar_torch.{op}: a bias goes with linear=True only")
    torch._check(not stacked or (linear and len(a) >= 1),
                 lambda: f"crossbar_torch.{op}: stacked goes with linear=True and a product")
    if stacked:  # row blocks of one input, one output
        return [torch.nn.functional.linear(torch.cat(list(a)), b[0], bias)]
    return [torch.nn.functional.linear(x, y, bias) if linear else torch.matmul(x, y)
            for x, y in zip(a, b)]
