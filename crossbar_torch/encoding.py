"""The encoding arithmetic of a weight's cells (docs/semantics.md rule 3), in one place.

A B-bit signed weight is stored as slices of ``bits_per_cell`` bits: the differential encoding
keeps |q|'s B-1 magnitude bits twice (a positive and a negative array, 2S cells), two's
complement and offset keep the B-bit word once (S cells). The C++ kernels hold the same
arithmetic in ``csrc/common.h`` (``Format``), where it must be compiled in; everything in Python
reads it from here (the config's derived fields, the mapping, the ops, the periphery).
"""
from __future__ import annotations

import math

import torch

ENCODINGS = ("differential", "twos_complement", "offset")


def _name(encoding: int | str) -> str:
    return ENCODINGS[encoding] if isinstance(encoding, int) else encoding


def magnitude_bits(weight_bits: int, encoding: int | str) -> int:
    """Bits stored per array: B-1 magnitude bits (differential) or the B-bit word."""
    return weight_bits - 1 if _name(encoding) == "differential" else weight_bits


def arrays_for(encoding: int | str) -> int:
    """Arrays a weight spans: 2 (differential: positive and negative) or 1."""
    return 2 if _name(encoding) == "differential" else 1


def slices_for(weight_bits: int, bits_per_cell: int, encoding: int | str) -> int:
    """S: slices per array."""
    return math.ceil(magnitude_bits(weight_bits, encoding) / bits_per_cell)


def cells_for(weight_bits: int, bits_per_cell: int, encoding: int | str) -> int:
    """c: cells one weight occupies (2S for differential, S otherwise)."""
    return arrays_for(encoding) * slices_for(weight_bits, bits_per_cell, encoding)


def cell_weights(weight_bits: int, bits_per_cell: int, encoding: int | str) -> tuple:
    """(w_i (c,) float64, encoding offset): q = sum_i w_i * level_i - offset (rules 3 and 18)."""
    enc = _name(encoding)
    S, b, B = slices_for(weight_bits, bits_per_cell, enc), bits_per_cell, weight_bits
    w = [float(2 ** (b * i)) for i in range(S)]
    if enc == "differential":
        return torch.tensor(w + [-v for v in w], dtype=torch.float64), 0.0
    if enc == "offset":
        return torch.tensor(w, dtype=torch.float64), float(2 ** (B - 1) - 1)  # u = q + qmax
    # two's complement, top slice = the sign bit alone (checked by the config)
    w[-1] = -float(2 ** (B - 1))
    return torch.tensor(w, dtype=torch.float64), 0.0


def cell_slices(weight_bits: int, bits_per_cell: int, encoding: int | str) -> list:
    """Slice of each of a weight's c cells."""
    S = slices_for(weight_bits, bits_per_cell, encoding)
    return [i % S for i in range(cells_for(weight_bits, bits_per_cell, encoding))]


# ---- the packed storage of levels (crossbar_torch/packing.py; csrc/common.h) -------------------

def slot_bits(bits_per_cell: int) -> int:
    """s: the bits a cell's slot takes when packed (the smallest power of two >= b)."""
    return 1 << (bits_per_cell - 1).bit_length()


def cells_per_byte(bits_per_cell: int) -> int:
    return 8 // slot_bits(bits_per_cell)


def packed_width(cells: int, bits_per_cell: int) -> int:
    """Bytes one weight's ``cells`` levels take packed."""
    return -(-cells // cells_per_byte(bits_per_cell))
