"""How a crossbar layer stores its cells (issue 19, docs/checkpoints.md): packed, because at one
byte per cell the held levels and the stuck flags were most of a converted model's memory
(ViT-Base: 86M weights x 14 one-bit cells = 1.2 GB each).

* levels: a b-bit cell's level sits in a slot of s bits, s the smallest power of two >= b
  (1, 2, 4 or 8); ``8 // s`` cells share a byte, cell ``j`` of a weight in byte ``j // (8 // s)``
  at bit ``(j % (8 // s)) * s``, little end first (``numpy.packbits(bitorder="little")`` of the
  slots' bits). A weight's c cells take ``ceil(c / (8 // s))`` bytes; the bits past the last
  cell, and a slot's bits above b, are 0. b > 4 stores one cell a byte, unchanged.
* stuck flags: one bit per cell, the same layout with s = 1.

The packed form is canonical (unused bits 0), so two packed tensors are equal exactly when the
levels are: code that only compares or hashes them never unpacks. Everything else unpacks one
layer at a time (``CrossbarMixin.held_cells`` / ``stuck_cells``), a transient copy freed when
the caller is done with it. On the host, two kernels (the ``pack_levels`` / ``unpack_levels``
ops: a byte table); on a device, plain torch ops, with no host synchronisation.
"""
from __future__ import annotations

import torch

from . import ops
# the layout's sizes live with the rest of the format arithmetic (the ops' fake kernels need them)
from .encoding import cells_per_byte, packed_width, slot_bits  # noqa: F401


def pack_levels(levels: torch.Tensor, bits_per_cell: int) -> torch.Tensor:
    """uint8 (..., c) levels in [0, 2^b) -> uint8 (..., ceil(c / (8 // s))) packed."""
    s = slot_bits(bits_per_cell)
    levels = levels.to(torch.uint8)
    if s == 8:
        return levels.contiguous()
    if levels.device.type != "cpu" or torch.compiler.is_compiling():
        return _pack_levels_torch(levels, bits_per_cell)
    return ops.pack_levels(levels, bits_per_cell)  # the host kernel: a byte at a time


def _pack_levels_torch(levels: torch.Tensor, bits_per_cell: int) -> torch.Tensor:
    """:func:`pack_levels` in torch ops (any device, no host synchronisation)."""
    s = slot_bits(bits_per_cell)
    levels = levels.to(torch.uint8)
    if s == 8:
        return levels.contiguous()
    *lead, c = levels.shape
    per = 8 // s
    width = packed_width(c, bits_per_cell)
    padded = levels.new_zeros(*lead, width * per)
    padded[..., :c] = levels
    parts = padded.reshape(*lead, width, per)
    out = parts[..., 0].clone()
    for i in range(1, per):
        out |= parts[..., i] << (i * s)
    return out


def unpack_levels(packed: torch.Tensor, cells: int, bits_per_cell: int) -> torch.Tensor:
    """uint8 (..., ceil(c / (8 // s))) packed -> uint8 (..., c) levels."""
    s = slot_bits(bits_per_cell)
    if s == 8:  # a copy even where the slice is the whole tensor: callers may write to it
        return packed[..., :cells].clone(memory_format=torch.contiguous_format)
    if packed.device.type != "cpu" or torch.compiler.is_compiling():  # traced: torch ops
        return _unpack_levels_torch(packed, cells, bits_per_cell)
    return ops.unpack_levels(packed, cells, bits_per_cell)  # the host kernel: a byte table


def _unpack_levels_torch(packed: torch.Tensor, cells: int, bits_per_cell: int) -> torch.Tensor:
    """:func:`unpack_levels` in torch ops (any device, no host synchronisation)."""
    s = slot_bits(bits_per_cell)
    if s == 8:
        return packed[..., :cells].clone(memory_format=torch.contiguous_format)
    per, top = 8 // s, (1 << s) - 1
    parts = [(packed >> (i * s)) & top for i in range(per)]
    return torch.stack(parts, -1).flatten(-2)[..., :cells].contiguous()


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool (..., c) -> uint8 (..., ceil(c / 8)): 8 flags a byte."""
    return pack_levels(mask.to(torch.uint8), 1)


def unpack_mask(packed: torch.Tensor, cells: int) -> torch.Tensor:
    """uint8 (..., ceil(c / 8)) -> bool (..., c)."""
    # one-bit slots unpack to bytes 0 and 1, which are bools as they are: no copy
    return unpack_levels(packed, cells, 1).view(torch.bool)


def is_canonical(packed: torch.Tensor, cells: int, bits_per_cell: int) -> bool:
    """Whether ``packed`` is what packing some levels in [0, 2^b) gives: the bits past the last
    cell and a slot's bits above b are 0. A loaded buffer that is not was not written by this
    package."""
    levels = unpack_levels(packed, cells, bits_per_cell)
    if levels.numel() and int(levels.max()) >= 1 << bits_per_cell:
        return False
    return torch.equal(pack_levels(levels, bits_per_cell), packed)
