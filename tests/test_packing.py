"""The packed storage of cells and stuck flags (issue 19, docs/checkpoints.md): the layout held
to a bit-by-bit recomputation written from the documentation, on CPU (numpy) and on the
device-independent torch path, with random shapes, cell widths and sizes (empty included)."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import crossbar_torch as xb
from crossbar_torch import ops, packing
from crossbar_torch.ops import reference

from independent import pack_by_hand


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


@pytest.mark.parametrize("b", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("torch_path", [False, True])
def test_unpacked_levels_are_a_new_tensor(b, torch_path):
    """Programming writes into the levels it unpacks (programming.layer_targets marks the free
    cells of ``held_cells()`` in place): with 8-bit slots (b >= 5) the packed tensor is the
    levels themselves, and unpacking must still copy it."""
    g = torch.Generator().manual_seed(b)
    levels = torch.randint(0, 1 << b, (3, 4, 6), generator=g).to(torch.uint8)
    packed = packing.pack_levels(levels.clone(), b)  # (b >= 5: packing returns its input)
    unpack = packing._unpack_levels_torch if torch_path else packing.unpack_levels
    out = unpack(packed, 6, b)
    out.fill_(255)
    assert torch.equal(unpack(packed, 6, b), levels)


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


@settings(max_examples=100, deadline=None)
@given(shapes, st.integers(1, 8), st.integers(0, 2**31 - 1), st.booleans())
def test_host_kernels_agree_with_the_device_path(shape, b, seed, transposed):
    """The CPU ops (a byte table) against the torch ops every device runs: unpacking any bytes
    (non-canonical ones too, which is_canonical must see), packing any levels in [0, 2^b),
    from non-contiguous tensors as well."""
    g = torch.Generator().manual_seed(seed)
    c = shape[-1]
    width = packing.packed_width(c, b)
    raw = torch.randint(0, 256, (*shape[:-1], width), generator=g, dtype=torch.int64)
    raw = raw.to(torch.uint8)
    levels = torch.randint(0, 1 << b, shape, generator=g, dtype=torch.int64).to(torch.uint8)
    if transposed and len(shape) == 3:  # same shape, another memory order
        raw = raw.transpose(0, 1).contiguous().transpose(0, 1)
        levels = levels.transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.equal(packing.unpack_levels(raw, c, b), packing._unpack_levels_torch(raw, c, b))
    assert torch.equal(packing.pack_levels(levels, b), packing._pack_levels_torch(levels, b))


@pytest.mark.parametrize("call, match", [
    (lambda: ops.unpack_levels(torch.zeros(3, 2), 14, 1), "packed must be Byte"),
    (lambda: ops.unpack_levels(torch.zeros(3, 3, dtype=torch.uint8), 14, 1),
     r"packed.size\(-1\) must be 2 for 14 cells"),
    (lambda: ops.unpack_levels(torch.zeros(3, 2, dtype=torch.uint8), 14, 9), "bits_per_cell"),
    (lambda: ops.unpack_levels(torch.zeros(3, 2, dtype=torch.uint8), -1, 1), "cells must be"),
    (lambda: ops.unpack_levels(torch.zeros((), dtype=torch.uint8), 1, 1), "trailing byte axis"),
    (lambda: ops.pack_levels(torch.zeros(3, 14, dtype=torch.int32), 1), "levels must be Byte"),
    (lambda: ops.pack_levels(torch.zeros(3, 14, dtype=torch.uint8), 0), "bits_per_cell"),
])
def test_packing_ops_refuse_bad_tensors(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def test_packing_ops_trace_on_meta_tensors():
    packed = ops.pack_levels(torch.empty(3, 5, 14, dtype=torch.uint8, device="meta"), 1)
    assert packed.shape == (3, 5, 2) and packed.device.type == "meta"
    levels = ops.unpack_levels(torch.empty(4, 2, dtype=torch.uint8, device="meta"), 5, 2)
    assert levels.shape == (4, 5)
    with pytest.raises(RuntimeError, match=r"packed.size\(-1\) must be 2"):
        ops.unpack_levels(torch.empty(4, 3, dtype=torch.uint8, device="meta"), 5, 2)


@pytest.mark.parametrize("b", [1, 2, 3, 8])
def test_packing_ops_pass_opcheck(b):
    """Schema, fake kernel and the CPU kernel agree (torch.library.opcheck)."""
    levels = torch.randint(0, 1 << b, (3, 4, 11), dtype=torch.int64).to(torch.uint8)
    torch.library.opcheck(torch.ops.crossbar_torch.pack_levels.default, (levels, b))
    packed = packing.pack_levels(levels, b) if b < 8 else levels
    torch.library.opcheck(torch.ops.crossbar_torch.unpack_levels.default, (packed, 11, b))
