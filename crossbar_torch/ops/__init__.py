"""Python entry points of the ``torch.ops.crossbar_torch`` custom ops.

The kernels live in ``csrc/`` (CPU always, CUDA when built with it) and are registered with
``TORCH_LIBRARY``; this module loads the compiled library, registers the fake (meta) kernels so
the ops trace under ``torch.compile``, and offers thin typed wrappers. ``reference`` holds the
plain-PyTorch implementation every kernel is tested against (tests only: production code never
calls it).
"""
from __future__ import annotations

import torch

from ..mapping import STAT_NAMES, cells_for, slices_for

DIFFERENTIAL, TWOS_COMPLEMENT, OFFSET = 0, 1, 2  # the ops' `encoding` argument

try:
    from .. import _C  # noqa: F401  (registers torch.ops.crossbar_torch.*)
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "crossbar_torch._C is not built: run `pip install -e . --no-build-isolation` in the "
        f"checkout (see README.md). Original error: {exc}") from exc

_ops = torch.ops.crossbar_torch


# ---- fake kernels: shapes and dtypes only, for torch.compile / meta tensors ----------------

@torch.library.register_fake("crossbar_torch::encode")
def _encode_fake(q, weight_bits, bits_per_cell, encoding):
    c = cells_for(weight_bits, bits_per_cell, encoding)
    return q.new_empty((*q.shape, c), dtype=torch.uint8)


@torch.library.register_fake("crossbar_torch::decode")
def _decode_fake(cells, weight_bits, bits_per_cell, encoding):
    return cells.new_empty(cells.shape[:-1], dtype=torch.int32)


@torch.library.register_fake("crossbar_torch::effective_weight")
def _effective_weight_fake(cells, index, scale, weight_bits, bits_per_cell, encoding):
    return cells.new_empty(cells.shape[:-1], dtype=torch.float32)


@torch.library.register_fake("crossbar_torch::sort_and_encode")
def _sort_and_encode_fake(w, scale, index, weight_bits, bits_per_cell, encoding):
    c = cells_for(weight_bits, bits_per_cell, encoding)
    return w.new_empty((*index.shape, c), dtype=torch.uint8)


@torch.library.register_fake("crossbar_torch::program_layer")
def _program_layer_fake(cells, filter_index, order, pinned, state, written, stuck, cell_writes,
                        tile_offset, rows, cols, weight_bits, bits_per_cell, encoding,
                        stuck_initial, count_cells, compensate_slices, window):
    out, k = cells.shape[0], cells.shape[1]
    F = cols // cells.shape[2]
    tiles = (-(-out // F)) * (-(-k // rows)) if out and k else 0
    return (torch.empty_like(cells),
            cells.new_empty((len(STAT_NAMES) + slices_for(weight_bits, bits_per_cell, encoding),),
                            dtype=torch.int64),
            cells.new_empty((tiles,), dtype=torch.int64))


@torch.library.register_fake("crossbar_torch::compensate")
def _compensate_fake(cells, held, old, weight_bits, bits_per_cell, encoding, compensate_slices):
    return torch.empty_like(cells)


# ---- wrappers -------------------------------------------------------------------------------

def encode(q, weight_bits: int, bits_per_cell: int, encoding: int) -> torch.Tensor:
    return _ops.encode(q, weight_bits, bits_per_cell, encoding)


def decode(cells, weight_bits: int, bits_per_cell: int, encoding: int) -> torch.Tensor:
    return _ops.decode(cells, weight_bits, bits_per_cell, encoding)


def effective_weight(cells, index, scale, weight_bits: int, bits_per_cell: int,
                     encoding: int) -> torch.Tensor:
    return _ops.effective_weight(cells, index, scale, weight_bits, bits_per_cell, encoding)


def sort_and_encode(w, scale, index, weight_bits: int, bits_per_cell: int,
                    encoding: int) -> torch.Tensor:
    return _ops.sort_and_encode(w, scale, index, weight_bits, bits_per_cell, encoding)


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
               compensate_slices: int) -> torch.Tensor:
    """Rule 13 per weight (the training forward's programming): see reference.compensate."""
    return _ops.compensate(cells, held, old, weight_bits, bits_per_cell, encoding,
                           compensate_slices)
