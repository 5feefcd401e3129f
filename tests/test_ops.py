"""The compiled custom ops (csrc/) agree exactly with the plain-PyTorch reference."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crossbar_torch.ops as ops
from crossbar_torch.ops import reference as ref

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device"))]
SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def formats(draw):
    """(weight_bits, bits_per_cell, encoding) with bits_per_cell <= magnitude bits."""
    B = draw(st.integers(2, 16))
    e = draw(st.integers(0, 2))
    magnitude = B - 1 if e == ref.DIFFERENTIAL else B
    b = draw(st.integers(1, min(4, magnitude)))
    return B, b, e


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def random_q(shape, B, g):
    qmax = 2 ** (B - 1) - 1
    return torch.randint(-qmax, qmax + 1, shape, generator=g, dtype=torch.int32)


def random_perm_index(out, K, g):
    if out == 0 or K == 0:
        return torch.zeros(out, K, dtype=torch.int64)
    return torch.argsort(torch.rand(out, K, generator=g), dim=1).contiguous()


shapes = st.lists(st.integers(0, 7), min_size=0, max_size=3)


# ---- encode / decode ------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(fmt=formats(), shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_encode_decode_match_reference(device, fmt, shape, seed):
    B, b, e = fmt
    q = random_q(shape, B, _gen(seed))
    cells = ops.encode(q.to(device), B, b, e)
    expect = ref.encode(q, B, b, e)
    assert cells.dtype == torch.uint8 and cells.shape == expect.shape
    assert torch.equal(cells.cpu(), expect)
    back = ops.decode(cells, B, b, e)
    assert back.dtype == torch.int32
    assert torch.equal(back.cpu(), q)  # round trip
    assert torch.equal(back.cpu(), ref.decode(expect, B, b, e))


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(fmt=formats(), shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_decode_arbitrary_levels_matches_reference(device, fmt, shape, seed):
    """Cells that hold any level in [0, 2**b) (stuck bits) decode like the reference, unclamped."""
    B, b, e = fmt
    c = ref.cells_for(B, b, e)
    cells = torch.randint(0, 2 ** b, (*shape, c), generator=_gen(seed), dtype=torch.uint8)
    assert torch.equal(ops.decode(cells.to(device), B, b, e).cpu(), ref.decode(cells, B, b, e))


def test_encode_extremes():
    for B in range(2, 17):
        qmax = 2 ** (B - 1) - 1
        q = torch.tensor([-qmax, -1, 0, 1, qmax], dtype=torch.int32)
        for e in range(3):
            for b in range(1, 9):
                assert torch.equal(ops.encode(q, B, b, e), ref.encode(q, B, b, e))
                assert torch.equal(ops.decode(ops.encode(q, B, b, e), B, b, e), q)


# ---- effective_weight / sort_and_encode -----------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(fmt=formats(), out=st.integers(0, 6), K=st.integers(0, 9), seed=st.integers(0, 2**31 - 1))
def test_effective_weight_matches_reference(device, fmt, out, K, seed):
    B, b, e = fmt
    g = _gen(seed)
    c = ref.cells_for(B, b, e)
    cells = torch.randint(0, 2 ** b, (out, K, c), generator=g, dtype=torch.uint8)
    index = random_perm_index(out, K, g)
    scale = torch.rand(out, generator=g) * 0.1 + 1e-3
    got = ops.effective_weight(cells.to(device), index.to(device), scale.to(device), B, b, e)
    assert got.dtype == torch.float32
    assert torch.equal(got.cpu(), ref.effective_weight(cells, index, scale, B, b, e))


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(fmt=formats(), out=st.integers(0, 6), K=st.integers(0, 9), seed=st.integers(0, 2**31 - 1),
       per_channel=st.booleans())
def test_sort_and_encode_matches_reference(device, fmt, out, K, seed, per_channel):
    B, b, e = fmt
    g = _gen(seed)
    w = torch.randn(out, K, generator=g) * 0.3
    if out and K:  # exact ties at .5 steps exercise round-half-to-even
        w[0, : (K + 1) // 2] = torch.arange((K + 1) // 2, dtype=torch.float32) * 0.5
    _, scale = ref.quantize(w, B, per_channel)
    if out:  # fine-tuned weights drift past the original range: clamping
        w = w * 1.5
    index = random_perm_index(out, K, g)
    got = ops.sort_and_encode(w.to(device), scale.to(device), index.to(device), B, b, e)
    assert got.dtype == torch.uint8
    assert torch.equal(got.cpu(), ref.sort_and_encode(w, scale, index, B, b, e))


def test_sort_and_encode_round_half_even():
    w = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5]])
    scale = torch.ones(1)
    index = torch.arange(7)[None]
    cells = ops.sort_and_encode(w, scale, index, 8, 1, ref.TWOS_COMPLEMENT)
    assert ops.decode(cells, 8, 1, ref.TWOS_COMPLEMENT).tolist() == [[0, 2, 2, 0, -2, -2, 4]]


# ---- program_layer --------------------------------------------------------------------------

def _pool_tensors(pool, rows, cols, b, g, stuck_p, preset_state):
    words = ref.words_for(cols)
    if preset_state:
        levels = torch.randint(0, 2 ** b, (pool, rows, cols), generator=g)
        state = ref.pack_levels(levels, b)
    else:
        state = torch.zeros(pool, rows, b, words, dtype=torch.int64)
    stuck = ref.pack_bits(torch.rand(pool, rows, cols, generator=g) < stuck_p)
    written = ref.pack_bits(torch.rand(pool, rows, cols, generator=g) < 0.2)
    cell_writes = torch.randint(0, 5, (pool, rows, cols), generator=g, dtype=torch.int32)
    return state, written, stuck, cell_writes


@st.composite
def program_cases(draw):
    B, b, e = draw(formats())
    c = ref.cells_for(B, b, e)
    cols = draw(st.sampled_from([c, c + 1, 7, 20, 63, 64, 65, 100, 128, 130, 200]).filter(
        lambda n: n >= c))
    rows = draw(st.integers(1, 9))
    return dict(B=B, b=b, e=e, c=c, cols=cols, rows=rows,
                pool=draw(st.integers(1, 4)),
                out=draw(st.integers(0, 3 * max(1, cols // c) + 1)),
                K=draw(st.integers(0, 3 * rows + 2)),
                stuck_p=draw(st.sampled_from([0.0, 0.3, 0.8])),
                stuck_initial=draw(st.booleans()),
                count_cells=draw(st.booleans()),
                preset_state=draw(st.booleans()),
                calls=draw(st.integers(1, 3)),
                offset=draw(st.integers(0, 5)),
                seed=draw(st.integers(0, 2**31 - 1)))


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=program_cases())
def test_program_layer_matches_reference(device, case):
    g = _gen(case["seed"])
    B, b, e, c, rows, cols, pool = (case[k] for k in ("B", "b", "e", "c", "rows", "cols", "pool"))
    slices = ref.slices_for(B, b, e)
    state, written, stuck, cell_writes = _pool_tensors(pool, rows, cols, b, g, case["stuck_p"],
                                                       case["preset_state"])
    mine = [t.clone().to(device) for t in (state, written, stuck, cell_writes)]
    offset = case["offset"]
    F = cols // c
    for call in range(case["calls"]):
        out, K = (case["out"], case["K"]) if call == 0 else (
            int(torch.randint(0, 2 * F + 2, (1,), generator=g)),
            int(torch.randint(0, 2 * rows + 2, (1,), generator=g)))
        q = random_q((out, K), B, g)
        cells = ref.encode(q, B, b, e)
        args = (offset, rows, cols, b, slices, case["stuck_initial"], case["count_cells"])
        eff_ref, stats_ref = ref.program_layer(cells, state, written, stuck, cell_writes, *args)
        eff, stats = ops.program_layer(cells.to(device), *mine, *args)
        assert torch.equal(eff.cpu(), eff_ref)
        assert torch.equal(stats.cpu(), stats_ref), (stats, stats_ref)
        for got, expect in zip(mine, (state, written, stuck, cell_writes)):
            assert torch.equal(got.cpu(), expect)
        n_tiles = (math.ceil(K / rows) * math.ceil(out / F)) if out and K else 0
        offset += n_tiles


def test_program_layer_multibit_pulses():
    """2-bit cells: 0 -> 3 is one write, one SET, three pulses; 3 -> 1 one RESET, two pulses."""
    state = torch.zeros(1, 1, 2, 1, dtype=torch.int64)
    written = torch.zeros(1, 1, 1, dtype=torch.int64)
    stuck = torch.zeros(1, 1, 1, dtype=torch.int64)
    cw = torch.zeros(1, 1, 4, dtype=torch.int32)
    cells = torch.tensor([[[3, 0]]], dtype=torch.uint8)
    _, stats = ops.program_layer(cells, state, written, stuck, cw, 0, 1, 4, 2, 1, False, True)
    assert stats.tolist() == [1, 1, 0, 3, 1, 1]
    cells = torch.tensor([[[1, 0]]], dtype=torch.uint8)
    _, stats = ops.program_layer(cells, state, written, stuck, cw, 0, 1, 4, 2, 1, False, True)
    assert stats.tolist() == [1, 0, 1, 2, 1, 1]
    assert cw.tolist() == [[[2, 0, 0, 0]]]


def test_program_layer_large_random_matches_reference():
    """One bigger layer (several words per row, pool 2, stucking) for good measure."""
    g = _gen(7)
    B, b, e = 8, 2, ref.DIFFERENTIAL
    slices = ref.slices_for(B, b, e)
    rows, cols, pool = 32, 150, 2
    state, written, stuck, cw = _pool_tensors(pool, rows, cols, b, g, 0.3, False)
    mine = [t.clone() for t in (state, written, stuck, cw)]
    cells = ref.encode(random_q((61, 77), B, g), B, b, e)
    for stuck_initial in (True, False):
        args = (3, rows, cols, b, slices, stuck_initial, True)
        e_ref, s_ref = ref.program_layer(cells, state, written, stuck, cw, *args)
        e_got, s_got = ops.program_layer(cells, *mine, *args)
        assert torch.equal(e_got, e_ref) and torch.equal(s_got, s_ref)
        for got, expect in zip(mine, (state, written, stuck, cw)):
            assert torch.equal(got, expect)


def test_program_layer_clears_padding_bits_like_reference():
    """Bits past `cols` in the last word of state / written are cleared, as the reference's
    repacking does; stuck is read only."""
    g = _gen(3)
    rows, cols, b = 3, 70, 2
    state = torch.randint(-2**62, 2**62, (2, rows, b, 2), generator=g)
    written = torch.randint(-2**62, 2**62, (2, rows, 2), generator=g)
    stuck = torch.randint(-2**62, 2**62, (2, rows, 2), generator=g)
    cw = torch.zeros(2, rows, cols, dtype=torch.int32)
    cells = torch.randint(0, 4, (5, 4, 7), generator=g, dtype=torch.uint8)
    mine = [t.clone() for t in (state, written, stuck, cw)]
    args = (1, rows, cols, b, 3, False, True)
    res_ref = ref.program_layer(cells, state, written, stuck, cw, *args)
    res = ops.program_layer(cells, *mine, *args)
    assert all(torch.equal(x, y) for x, y in zip(res, res_ref))
    assert all(torch.equal(x, y) for x, y in zip(mine, (state, written, stuck, cw)))


def test_program_layer_count_cells_false_ignores_cell_writes_shape():
    t = _layer()
    t["cell_writes"] = torch.zeros(0, dtype=torch.int32)
    _program(t, count=False)


def test_non_contiguous_inputs():
    g = _gen(5)
    q = random_q((6, 10), 8, g).t()
    assert not q.is_contiguous()
    cells = ops.encode(q, 8, 2, 0)
    assert torch.equal(cells, ref.encode(q, 8, 2, 0))
    cells_nc = cells.transpose(0, 1)
    assert torch.equal(ops.decode(cells_nc, 8, 2, 0), ref.decode(cells_nc, 8, 2, 0))
    w = torch.randn(9, 5, generator=g).t()
    _, scale = ref.quantize(w, 8, True)
    index = random_perm_index(5, 9, g)
    assert torch.equal(ops.sort_and_encode(w, scale, index, 8, 1, 1),
                       ref.sort_and_encode(w, scale, index, 8, 1, 1))


# ---- errors ---------------------------------------------------------------------------------

def _layer(pool=1, rows=4, cols=16, b=1, out=3, K=5, c=4):
    words = ref.words_for(cols)
    return dict(
        cells=torch.zeros(out, K, c, dtype=torch.uint8),
        state=torch.zeros(pool, rows, b, words, dtype=torch.int64),
        written=torch.zeros(pool, rows, words, dtype=torch.int64),
        stuck=torch.zeros(pool, rows, words, dtype=torch.int64),
        cell_writes=torch.zeros(pool, rows, cols, dtype=torch.int32))


def _program(t, rows=4, cols=16, b=1, slices=2, offset=0, count=True):
    return ops.program_layer(t["cells"], t["state"], t["written"], t["stuck"], t["cell_writes"],
                             offset, rows, cols, b, slices, True, count)


def _cpu_kernel(name, *args):
    """Call an op's CPU kernel directly (a meta tensor would otherwise route to the fake kernel):
    how a device mismatch reaches the kernel."""
    op = getattr(torch.ops.crossbar_torch, name).default
    return op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args)


def test_device_mismatch_errors():
    t = _layer()
    t["stuck"] = t["stuck"].to("meta")
    with pytest.raises(RuntimeError, match="stuck is on meta but cells is on cpu"):
        _cpu_kernel("program_layer", t["cells"], t["state"], t["written"], t["stuck"],
                    t["cell_writes"], 0, 4, 16, 1, 2, True, True)
    with pytest.raises(RuntimeError, match="scale is on meta but w is on cpu"):
        _cpu_kernel("sort_and_encode", torch.zeros(2, 3), torch.ones(2, device="meta"),
                    torch.zeros(2, 3, dtype=torch.int64), 8, 1, 0)


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_cuda_cpu_mismatch():
    t = _layer()
    t["state"] = t["state"].cuda()
    with pytest.raises(RuntimeError, match="same device"):
        _program(t)


def test_encode_errors():
    with pytest.raises(RuntimeError, match="q out of the symmetric range"):
        ops.encode(torch.tensor([128], dtype=torch.int32), 8, 1, 0)
    with pytest.raises(RuntimeError, match="q out of the symmetric range"):
        ops.encode(torch.tensor([-128], dtype=torch.int32), 8, 1, 0)
    with pytest.raises(RuntimeError, match="q must be Int"):
        ops.encode(torch.tensor([1], dtype=torch.int64), 8, 1, 0)
    with pytest.raises(RuntimeError, match="weight_bits"):
        ops.encode(torch.tensor([1], dtype=torch.int32), 17, 1, 0)
    with pytest.raises(RuntimeError, match="bits_per_cell"):
        ops.encode(torch.tensor([1], dtype=torch.int32), 8, 9, 0)
    with pytest.raises(RuntimeError, match="encoding"):
        ops.encode(torch.tensor([1], dtype=torch.int32), 8, 1, 3)


def test_decode_errors():
    with pytest.raises(RuntimeError, match="cells per weight"):
        ops.decode(torch.zeros(3, 5, dtype=torch.uint8), 8, 1, 0)  # c = 14
    with pytest.raises(RuntimeError, match="cells must be Byte"):
        ops.decode(torch.zeros(3, 14, dtype=torch.int32), 8, 1, 0)


def test_effective_weight_errors():
    cells = torch.zeros(2, 3, 14, dtype=torch.uint8)
    index = torch.arange(3).expand(2, 3).contiguous()
    scale = torch.ones(2)
    with pytest.raises(RuntimeError, match="index entries must be in"):
        ops.effective_weight(cells, index + 1, scale, 8, 1, 0)
    with pytest.raises(RuntimeError, match="scale.size"):
        ops.effective_weight(cells, index, torch.ones(3), 8, 1, 0)
    with pytest.raises(RuntimeError, match="index must be Long"):
        ops.effective_weight(cells, index.int(), scale, 8, 1, 0)
    with pytest.raises(RuntimeError, match="index is on meta but cells is on cpu"):
        _cpu_kernel("effective_weight", cells, index.to("meta"), scale, 8, 1, 0)


def test_sort_and_encode_errors():
    w = torch.zeros(2, 3)
    index = torch.arange(3).expand(2, 3).contiguous()
    scale = torch.ones(2)
    for bad in (float("nan"), float("inf")):
        w_bad = w.clone()
        w_bad[1, 2] = bad
        with pytest.raises(RuntimeError, match="NaN or Inf"):
            ops.sort_and_encode(w_bad, scale, index, 8, 1, 0)
    with pytest.raises(RuntimeError, match="w must be Float"):
        ops.sort_and_encode(w.double(), scale, index, 8, 1, 0)
    with pytest.raises(RuntimeError, match="index.size"):
        ops.sort_and_encode(w, scale, index[:, :2], 8, 1, 0)
    with pytest.raises(RuntimeError, match="index entries"):
        ops.sort_and_encode(w, scale, index - 1, 8, 1, 0)


@pytest.mark.parametrize("mutate, match", [
    (lambda t: t.update(state=t["state"].int()), "state must be Long"),
    (lambda t: t.update(cells=t["cells"].long()), "cells must be Byte"),
    (lambda t: t.update(stuck=t["stuck"][:, :3]), "stuck.size"),
    (lambda t: t.update(written=t["written"][:, :2]), "written.size"),
    (lambda t: t.update(state=torch.zeros(1, 4, 2, 1, dtype=torch.int64)), "bits_per_cell"),
    (lambda t: t.update(state=torch.zeros(1, 5, 1, 1, dtype=torch.int64)), "rows"),
    (lambda t: t.update(state=torch.zeros(1, 4, 1, 2, dtype=torch.int64)), "words"),
    (lambda t: t.update(cell_writes=torch.zeros(1, 4, 15, dtype=torch.int32)), "cols"),
    (lambda t: t.update(cell_writes=t["cell_writes"].long()), "cell_writes must be Int"),
    (lambda t: t.update(cells=torch.full((3, 5, 4), 2, dtype=torch.uint8)), "level 2"),
    (lambda t: t.update(cells=torch.zeros(3, 5, 17, dtype=torch.uint8)), "must be <= cols"),
    (lambda t: t.update(state=torch.zeros(1, 4, 1, 2, dtype=torch.int64)[..., :1]),
     "state must be contiguous"),
])
def test_program_layer_errors(mutate, match):
    t = _layer(pool=1)
    mutate(t)
    with pytest.raises(RuntimeError, match=match):
        _program(t)


def test_program_layer_scalar_errors():
    with pytest.raises(RuntimeError, match="tile_offset"):
        _program(_layer(), offset=-1)
    with pytest.raises(RuntimeError, match="slices"):
        _program(_layer(), slices=0)
    with pytest.raises(RuntimeError, match="bits_per_cell"):
        _program(_layer(), b=9)
    with pytest.raises(RuntimeError, match="rows"):
        _program(_layer(), rows=0)


def test_program_layer_bad_input_leaves_state_untouched():
    t = _layer()
    t["cells"] = torch.full((3, 5, 4), 1, dtype=torch.uint8)
    t["cells"][2, 4, 3] = 7
    with pytest.raises(RuntimeError):
        _program(t)
    assert not t["state"].any() and not t["written"].any() and not t["cell_writes"].any()
