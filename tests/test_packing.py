"""The packed storage of cells and stuck flags (issue 19, docs/checkpoints.md): the layout held
to a bit-by-bit recomputation written from the documentation, on CPU (numpy) and on the
device-independent torch path, with random shapes, cell widths and sizes (empty included)."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import crossbar_torch as xb
from crossbar_torch import packing
from crossbar_torch.ops import reference


def slot(b):  # the smallest power of two >= b
    s = 1
    while s < b:
        s *= 2
    return s


def pack_by_hand(levels, b):
    """Cell j of a weight: byte j // (8 // s), bits (j % (8 // s)) * s upward (docs)."""
    s = slot(b)
    per = 8 // s
    *lead, c = levels.shape
    width = -(-c // per)
    flat = levels.reshape(-1, c).tolist()
    out = []
    for row in flat:
        bytes_ = [0] * width
        for j, level in enumerate(row):
            bytes_[j // per] |= int(level) << ((j % per) * s)
        out.append(bytes_)
    return torch.tensor(out, dtype=torch.uint8).reshape(*lead, width)


shapes = st.tuples(st.integers(0, 5), st.integers(0, 7), st.integers(1, 20))


@settings(max_examples=200, deadline=None)
@given(shapes, st.integers(1, 8), st.integers(0, 2**31 - 1), st.booleans())
def test_packing_matches_the_documented_layout(shape, b, seed, torch_path):
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 1 << b, shape, generator=g, dtype=torch.int64).to(torch.uint8)
    want = pack_by_hand(levels, b)
    c = shape[-1]
    if torch_path:  # the path every non-CPU device takes (no numpy)
        got = packing._pack_levels_torch(levels, b)
        back = packing._unpack_levels_torch(got, c, b)
    else:
        got = packing.pack_levels(levels, b)
        back = packing.unpack_levels(got, c, b)
    assert got.dtype == torch.uint8 and torch.equal(got, want)
    assert got.shape[-1] == packing.packed_width(c, b)
    assert torch.equal(back, levels)
    assert packing.is_canonical(got, c, b)


@settings(max_examples=100, deadline=None)
@given(shapes, st.integers(0, 2**31 - 1))
def test_masks_pack_eight_a_byte(shape, seed):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.4
    packed = packing.pack_mask(mask)
    assert torch.equal(packed, pack_by_hand(mask.to(torch.uint8), 1))
    assert torch.equal(packing.unpack_mask(packed, shape[-1]), mask)


@pytest.mark.parametrize("b, c, byte, why", [
    (1, 14, 0b1100_0000, "bits past the last of 14 cells"),
    (3, 3, 0b1000_1000, "a slot's bit above b = 3 (level 8)"),
    (2, 3, 0b1100_0000, "the fourth slot of a byte holding 3 cells"),
])
def test_non_canonical_packings_are_recognised(b, c, byte, why):
    packed = packing.pack_levels(torch.zeros(2, c, dtype=torch.uint8), b)
    packed[1, -1] |= byte
    assert not packing.is_canonical(packed, c, b), why


@pytest.mark.parametrize("fields, c", [({}, 14), ({"bits_per_cell": 2}, 8),
                                       ({"bits_per_cell": 3, "weight_bits": 7}, 4),
                                       ({"bits_per_cell": 8, "weight_bits": 9}, 2)])
def test_a_layer_stores_its_cells_packed_and_computes_with_the_levels(fields, c):
    torch.manual_seed(0)
    cfg = xb.CrossbarConfig(sort="value", stuck_slices=1, reprogram_fraction=0.5,
                            compensate=True, **fields)
    assert cfg.cells_per_weight == c
    layer = xb.convert(nn.Linear(20, 6), cfg).eval()
    levels = layer.held_cells()
    assert levels.shape == (6, 20, c)
    assert layer.cells.shape == (6, 20, packing.packed_width(c, cfg.bits_per_cell))
    assert torch.equal(layer.cells, pack_by_hand(levels, cfg.bits_per_cell))
    assert torch.equal(layer.stuck, pack_by_hand(layer.stuck_cells().to(torch.uint8), 1))
    assert layer.stuck_cells().any()  # p = 0.5 of slice 0: some are stuck
    # the weight it computes with is the decode of the unpacked levels
    q = reference.decode(levels, cfg.weight_bits, cfg.bits_per_cell, cfg.encoding_id)
    want = torch.empty_like(q.float()).scatter_(1, layer.sort_index.long(), q.float())
    assert torch.equal(layer.effective_weight(), want * layer.scale[:, None])
