"""The compiled custom ops (csrc/) agree exactly with the plain-PyTorch reference."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crossbar_torch.ops as ops
from crossbar_torch.ops import reference as ref

from independent import pack_by_hand

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

def _effective_weight_case(fmt, out, K, seed):
    """Random held levels (out, K, c) of the format, a random sort index and scales."""
    B, b, e = fmt
    g = _gen(seed)
    cells = torch.randint(0, 2 ** b, (out, K, ref.cells_for(B, b, e)), generator=g,
                          dtype=torch.uint8)
    return cells, random_perm_index(out, K, g), torch.rand(out, generator=g) * 0.1 + 1e-3


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(fmt=formats(), out=st.integers(0, 6), K=st.integers(0, 9), seed=st.integers(0, 2**31 - 1))
def test_effective_weight_matches_reference(device, fmt, out, K, seed):
    B, b, e = fmt
    cells, index, scale = _effective_weight_case(fmt, out, K, seed)
    got = ops.effective_weight(cells.to(device), index.to(device), scale.to(device), B, b, e)
    assert got.dtype == torch.float32
    assert torch.equal(got.cpu(), ref.effective_weight(cells, index, scale, B, b, e))


@SETTINGS
@given(fmt=formats(), out=st.integers(0, 6), K=st.integers(0, 9), seed=st.integers(0, 2**31 - 1))
def test_effective_weight_decodes_a_packed_buffer_on_the_host(fmt, out, K, seed):
    """A layer's packed ``cells`` buffer (packed by hand: one, two or four bits a slot, one byte
    a weight and more, past the two-byte table) gives the reference's W_eff of the levels it
    packs; a slot holding a level the cell cannot (b = 3: a nibble of 8 or more) is refused."""
    B, b, e = fmt
    cells, index, scale = _effective_weight_case(fmt, out, K, seed)
    packed = pack_by_hand(cells, b)
    got = ops.effective_weight(packed, index, scale, B, b, e)
    assert torch.equal(got, ref.effective_weight(cells, index, scale, B, b, e))
    if b == 3 and packed.numel():
        packed.view(-1)[0] |= 0x08  # the first slot's nibble: 8 or more
        with pytest.raises(RuntimeError, match="hold level"):
            ops.effective_weight(packed, index, scale, B, b, e)


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


@SETTINGS
@given(fmt=formats(), out=st.integers(1, 40), K=st.integers(1, 90), seed=st.integers(0, 2**31 - 1))
def test_sort_and_encode_by_level_table_matches_reference(fmt, out, K, seed):
    """Layers with at least as many weights as levels: the CPU kernel encodes through its
    per-level table with copies that overrun into the next weight (rows split across threads),
    which must leave every cell as the reference's."""
    B, b, e = fmt
    g = _gen(seed)
    w = torch.randn(out, K, generator=g)
    _, scale = ref.quantize(w, B, True)
    index = random_perm_index(out, K, g)
    got = ops.sort_and_encode(w * 1.2, scale, index, B, b, e)
    assert torch.equal(got, ref.sort_and_encode(w * 1.2, scale, index, B, b, e))


@pytest.mark.parametrize("fmt", [(16, 1, 0), (16, 1, 1), (16, 3, 2), (8, 1, 0), (8, 2, 1)])
def test_sort_and_encode_wide_formats_by_table(fmt):
    """16-bit weights (65,535 levels, up to 30 cells: 32-byte table rows) on a layer large
    enough to use the table, with a few threads' worth of rows."""
    B, b, e = fmt
    g = _gen(B * 100 + b * 10 + e)
    w = torch.randn(300, 257, generator=g)
    _, scale = ref.quantize(w, B, True)
    index = random_perm_index(300, 257, g)
    assert torch.equal(ops.sort_and_encode(w, scale, index, B, b, e),
                       ref.sort_and_encode(w, scale, index, B, b, e))


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


def random_placement(out, F, g, holes):
    """A filter_index: every filter once; with ``holes`` the rule-11 layout with unused slots
    spread over the blocks (a random ranking), else natural."""
    nb = math.ceil(out / F) if out else 0
    index = torch.full((nb * F,), -1, dtype=torch.int64)
    if holes:
        rank = torch.arange(out)
        index[(rank % nb) * F + rank // nb] = torch.randperm(out, generator=g)
    else:
        index[:out] = torch.arange(out)
    return index


def random_pinned(shape, b, g, p):
    """Known stuck levels on a random fraction p of the cells (255 elsewhere)."""
    levels = torch.randint(0, 2 ** b, shape, generator=g, dtype=torch.uint8)
    return torch.where(torch.rand(shape, generator=g) < p, levels,
                       torch.full(shape, 255, dtype=torch.uint8))


EMPTY_ORDER = torch.zeros(0, dtype=torch.int64)
EMPTY_PIN = torch.zeros(0, dtype=torch.uint8)


def call_program(impl, cells, pool_tensors, offset, rows, cols, B, b, e, stuck_initial=True,
                 count_cells=True, index=None, order=None, pinned=None, comp=0, window=0):
    state, written, stuck, cell_writes = pool_tensors
    dev = cells.device
    index = torch.zeros(0, dtype=torch.int64) if index is None else index
    return impl(cells, index.to(dev), (EMPTY_ORDER if order is None else order).to(dev),
                (EMPTY_PIN if pinned is None else pinned).to(dev), state, written, stuck,
                cell_writes, offset, rows, cols, B, b, e, stuck_initial, count_cells, comp,
                window)


@st.composite
def program_cases(draw):
    B, b, e = draw(formats())
    c = ref.cells_for(B, b, e)
    S = ref.slices_for(B, b, e)
    cols = draw(st.sampled_from([c, c + 1, 7, 20, 63, 64, 65, 100, 128, 130, 200]).filter(
        lambda n: n >= c))
    rows = draw(st.integers(1, 9))
    # rule 13 enumerates 2**(bits of the low cells) per weight: keep the cases small
    max_comp = max(L for L in range(S + 1) if (c // S) * L * b <= 10)
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
                holes=draw(st.booleans()),
                pinned=draw(st.sampled_from([0.0, 0.0, 0.4])),
                comp=draw(st.integers(0, max_comp)),
                window=draw(st.sampled_from([0, 0, 1, 2, 3, 50])),
                seed=draw(st.integers(0, 2**31 - 1)))


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=program_cases())
def test_program_layer_matches_reference(device, case):
    """Random shapes, formats, pools, placements with unused slots, pinned levels, rule-13
    compensation and greedy windows: effective cells, counters, the chosen order and the
    crossbar state all agree exactly; a replay of the chosen order agrees too."""
    g = _gen(case["seed"])
    B, b, e, c, rows, cols, pool = (case[k] for k in ("B", "b", "e", "c", "rows", "cols", "pool"))
    theirs = _pool_tensors(pool, rows, cols, b, g, case["stuck_p"], case["preset_state"])
    mine = [t.clone().to(device) for t in theirs]
    offset = case["offset"]
    F = cols // c
    for call in range(case["calls"]):
        out, K = (case["out"], case["K"]) if call == 0 else (
            int(torch.randint(0, 2 * F + 2, (1,), generator=g)),
            int(torch.randint(0, 2 * rows + 2, (1,), generator=g)))
        cells = ref.encode(random_q((out, K), B, g), B, b, e)
        kw = dict(stuck_initial=case["stuck_initial"], count_cells=case["count_cells"],
                  index=random_placement(out, F, g, case["holes"]),
                  pinned=random_pinned(cells.shape, b, g, case["pinned"]) if case["pinned"]
                  else None, comp=case["comp"], window=case["window"])
        if call == 2:  # replay the order the previous call chose, on this call's shape
            kw["order"] = torch.randperm(math.ceil(K / rows) * math.ceil(out / F)
                                         if out and K else 0, generator=g)
        eff_ref, stats_ref, order_ref = call_program(ref.program_layer, cells, theirs, offset,
                                                     rows, cols, B, b, e, **kw)
        eff, stats, order = call_program(ops.program_layer, cells.to(device), mine, offset,
                                         rows, cols, B, b, e, **kw)
        assert torch.equal(eff.cpu(), eff_ref)
        assert torch.equal(stats.cpu(), stats_ref), (stats, stats_ref)
        assert torch.equal(order.cpu(), order_ref)
        for got, expect in zip(mine, theirs):
            assert torch.equal(got.cpu(), expect)
        n_tiles = (math.ceil(K / rows) * math.ceil(out / F)) if out and K else 0
        assert sorted(order.tolist()) == list(range(n_tiles))
        if kw.get("order") is not None:
            assert torch.equal(order.cpu(), kw["order"])
        elif not case["window"]:
            assert order.tolist() == list(range(n_tiles))
        offset += n_tiles


def _fresh_pool(rows, cols, b, pool=1):
    words = ref.words_for(cols)
    return [torch.zeros(pool, rows, b, words, dtype=torch.int64),
            torch.zeros(pool, rows, words, dtype=torch.int64),
            torch.zeros(pool, rows, words, dtype=torch.int64),
            torch.zeros(pool, rows, cols, dtype=torch.int32)]


def test_program_layer_multibit_pulses():
    """2-bit cells: 0 -> 3 is one write, one SET, three pulses (all SET pulses); 3 -> 1 one
    RESET, two pulses (no SET pulse). Stats: writes, sets, resets, pulses, rows, set pulses,
    then writes per slice (one slice here)."""
    t = _fresh_pool(1, 4, 2)
    cells = torch.tensor([[[3, 0]]], dtype=torch.uint8)  # differential, B=3, b=2: c=2
    _, stats, _ = call_program(ops.program_layer, cells, t, 0, 1, 4, 3, 2, 0, False)
    assert stats.tolist() == [1, 1, 0, 3, 1, 3, 1]
    cells = torch.tensor([[[1, 0]]], dtype=torch.uint8)
    _, stats, _ = call_program(ops.program_layer, cells, t, 0, 1, 4, 3, 2, 0, False)
    assert stats.tolist() == [1, 0, 1, 2, 1, 0, 1]
    assert t[3].tolist() == [[[2, 0, 0, 0]]]


def test_greedy_order_by_hand():
    """One row, 1-bit differential cells (B=2: c=2, one weight per crossbar, cols=2): tiles
    q = [1, -1, 1] (cells 10, 01, 10). From pristine (00) every tile differs in one cell: the
    first minimum is tile 0. Then the crossbar holds 10: tile 2 (distance 0) beats tile 1
    (distance 2). Section-major writes 1 + 2 + 2 = 5; greedy 1 + 0 + 2 = 3."""
    cells = torch.tensor([[[1, 0]], [[0, 1]], [[1, 0]]], dtype=torch.uint8)
    for impl in (ops.program_layer, ref.program_layer):
        _, stats, order = call_program(impl, cells, _fresh_pool(1, 2, 1), 0, 1, 2, 2, 1, 0,
                                       window=3)
        assert order.tolist() == [0, 2, 1] and stats[0] == 3
        _, stats, order = call_program(impl, cells, _fresh_pool(1, 2, 1), 0, 1, 2, 2, 1, 0)
        assert order.tolist() == [0, 1, 2] and stats[0] == 5
        # a window of 1 is section-major
        _, stats, order = call_program(impl, cells, _fresh_pool(1, 2, 1), 0, 1, 2, 2, 1, 0,
                                       window=1)
        assert order.tolist() == [0, 1, 2]


def test_compensation_by_hand():
    """4-bit two's complement in 1-bit cells, low slice stuck at 1 (L=1, stuck_value 1): q = 4
    (0100) cannot end in 0; the nearest values with a 1 in bit 0 are 3 (0011) and 5 (0101),
    both 1 away. The only low cell is held, so there is no free cell to search (x is empty)
    and the tie is settled by rule 13's rounding: h is the nearest to (4 - 1) / 2 = 1.5, a
    tie, so the even 2: decoded 2*2 + 1 = 5 (1 write, bit 2)."""
    B, b, e = 4, 1, ref.TWOS_COMPLEMENT
    cells = ref.encode(torch.tensor([[4]], dtype=torch.int32), B, b, e)
    for impl in (ops.program_layer, ref.program_layer):
        pool = _fresh_pool(1, 4, 1)
        pool[0][0, 0, 0, 0] = 1                        # cell 0 holds level 1 ...
        pool[2][0, 0, 0] = 1                           # ... and is stuck
        eff, stats, _ = call_program(impl, cells, pool, 0, 1, 4, B, b, e, stuck_initial=False,
                                     comp=1)
        assert ops.decode(eff, B, b, e).item() == 5
        assert eff.tolist() == [[[1, 0, 1, 0]]] and stats[0] == 1
        # without compensation the weight decodes to 4 + 1
        pool = _fresh_pool(1, 4, 1)
        pool[0][0, 0, 0, 0] = 1
        pool[2][0, 0, 0] = 1
        eff, _, _ = call_program(impl, cells, pool, 0, 1, 4, B, b, e, stuck_initial=False)
        assert ops.decode(eff, B, b, e).item() == 5
    # differential 3-bit (M = 2), L = 1: q = 2 wants pos = 10, neg = 00; the negative low cell
    # is held at 1: d = -1 with the free positive low cell at 0, +0 at 1: decoded 2h - 1 or
    # 2h: h = round((2 + 1)/2) = round(1.5) = 2 -> clamped to hmax = 1: 1; x = 1: h = 1 -> 2.
    B, e = 3, ref.DIFFERENTIAL
    cells = ref.encode(torch.tensor([[2]], dtype=torch.int32), B, b, e)   # pos 0,1  neg 0,0
    for impl in (ops.program_layer, ref.program_layer):
        pool = _fresh_pool(1, 4, 1)
        pool[0][0, 0, 0, 0] = 1 << 2                   # column 2 = negative slice 0
        pool[2][0, 0, 0] = 1 << 2
        eff, _, _ = call_program(impl, cells, pool, 0, 1, 4, B, b, e, stuck_initial=False,
                                 comp=1)
        assert eff.tolist() == [[[1, 1, 1, 0]]] and ops.decode(eff, B, b, e).item() == 2


def test_compensate_op_matches_reference():
    g = _gen(11)
    for B, b, e, L in [(8, 1, 0, 2), (8, 1, 1, 3), (8, 2, 2, 2), (6, 3, 0, 1), (5, 1, 1, 5),
                       (8, 3, 1, 3), (4, 1, 2, 0)]:
        c = ref.cells_for(B, b, e)
        cells = ref.encode(random_q((40, 3), B, g), B, b, e)
        old = torch.randint(0, 2 ** b, cells.shape, generator=g, dtype=torch.uint8)
        S = ref.slices_for(B, b, e)
        low = (torch.arange(c) % S) < L
        held = (torch.rand(cells.shape, generator=g) < 0.4) & low
        got = ops.compensate(cells, held, old, B, b, e, L)
        assert torch.equal(got, ref.compensate(cells, held, old, B, b, e, L)), (B, b, e, L)
        assert torch.equal(got[held], old[held])          # held cells keep their level
        free = ~held.any(-1)
        assert torch.equal(got[free], cells[free])        # weights with no held cell: plain


def test_program_layer_large_random_matches_reference():
    """One bigger layer (several words per row, pool 2, stucking, placement with holes,
    compensation, greedy) for good measure."""
    g = _gen(7)
    B, b, e = 8, 2, ref.DIFFERENTIAL
    rows, cols, pool = 32, 150, 2
    theirs = _pool_tensors(pool, rows, cols, b, g, 0.3, False)
    mine = [t.clone() for t in theirs]
    cells = ref.encode(random_q((61, 77), B, g), B, b, e)
    index = random_placement(61, cols // 8, g, True)
    for stuck_initial, comp, window in ((True, 0, 0), (False, 2, 0), (True, 1, 4)):
        kw = dict(stuck_initial=stuck_initial, index=index, comp=comp, window=window)
        e_ref, s_ref, o_ref = call_program(ref.program_layer, cells, theirs, 3, rows, cols, B, b,
                                           e, **kw)
        e_got, s_got, o_got = call_program(ops.program_layer, cells, mine, 3, rows, cols, B, b,
                                           e, **kw)
        assert torch.equal(e_got, e_ref) and torch.equal(s_got, s_ref)
        assert torch.equal(o_got, o_ref)
        for got, expect in zip(mine, theirs):
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
    cells = torch.randint(0, 4, (5, 4, 6), generator=g, dtype=torch.uint8)  # B=12, b=2, twos
    theirs = [state, written, stuck, cw]
    mine = [t.clone() for t in theirs]
    res_ref = call_program(ref.program_layer, cells, theirs, 1, rows, cols, 12, 2, 1, False)
    res = call_program(ops.program_layer, cells, mine, 1, rows, cols, 12, 2, 1, False)
    assert all(torch.equal(x, y) for x, y in zip(res, res_ref))
    assert all(torch.equal(x, y) for x, y in zip(mine, theirs))


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


def _program(t, rows=4, cols=16, b=1, B=3, e=0, offset=0, count=True, comp=0, window=0):
    return ops.program_layer(t["cells"], t.get("index", torch.zeros(0, dtype=torch.int64)),
                             t.get("order", EMPTY_ORDER), t.get("pinned", EMPTY_PIN),
                             t["state"], t["written"], t["stuck"], t["cell_writes"], offset,
                             rows, cols, B, b, e, True, count, comp, window)


def _cpu_kernel(name, *args):
    """Call an op's CPU kernel directly (a meta tensor would otherwise route to the fake kernel):
    how a device mismatch reaches the kernel."""
    op = getattr(torch.ops.crossbar_torch, name).default
    return op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args)


def test_device_mismatch_errors():
    t = _layer()
    t["stuck"] = t["stuck"].to("meta")
    with pytest.raises(RuntimeError, match="stuck is on meta but cells is on cpu"):
        _cpu_kernel("program_layer", t["cells"], EMPTY_ORDER, EMPTY_ORDER, EMPTY_PIN,
                    t["state"], t["written"], t["stuck"], t["cell_writes"], 0, 4, 16, 3, 1, 0,
                    True, True, 0, 0)
    with pytest.raises(RuntimeError, match="scale is on meta but w is on cpu"):
        _cpu_kernel("sort_and_encode", torch.zeros(2, 3), torch.ones(2, device="meta"),
                    torch.zeros(2, 3, dtype=torch.int64), 8, 1, 0)


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_cuda_cpu_mismatch():
    t = _layer()
    t["state"] = t["state"].cuda()  # dispatches to the CUDA kernel, which names the CPU tensor
    with pytest.raises(RuntimeError, match="cells must be a CUDA tensor here, got cpu"):
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
    (lambda t: t.update(cells=torch.zeros(3, 5, 17, dtype=torch.uint8)), "cells per weight c"),
    (lambda t: t.update(state=torch.zeros(1, 4, 1, 2, dtype=torch.int64)[..., :1]),
     "state must be contiguous"),
    (lambda t: t.update(index=torch.tensor([0, 1, 1, -1])), "places filter 1 twice"),
    (lambda t: t.update(index=torch.tensor([0, 1, -1, -1])), "no slot for filter 2"),
    (lambda t: t.update(index=torch.tensor([0, 1, 2])), "n_blocks \\* F"),
    (lambda t: t.update(index=torch.tensor([0, 1, 5, -1])), "not a filter"),
    (lambda t: t.update(order=torch.tensor([0, 0])), "permutation"),
    (lambda t: t.update(order=torch.tensor([0, 1, 2])), "order must be empty"),
    (lambda t: t.update(pinned=torch.zeros(3, 5, 3, dtype=torch.uint8)), "pinned must be"),
    (lambda t: t.update(pinned=torch.full((3, 5, 4), 7, dtype=torch.uint8)), "pinned levels"),
    (lambda t: t.update(index=torch.zeros(4, dtype=torch.int32)), "filter_index must be Long"),
])
def test_program_layer_errors(mutate, match):
    t = _layer(pool=1)
    mutate(t)
    with pytest.raises(RuntimeError, match=match):
        _program(t)


def test_program_layer_scalar_errors():
    with pytest.raises(RuntimeError, match="tile_offset"):
        _program(_layer(), offset=-1)
    with pytest.raises(RuntimeError, match="compensate_slices"):
        _program(_layer(), comp=3)
    with pytest.raises(RuntimeError, match="window"):
        _program(_layer(), window=-1)
    with pytest.raises(RuntimeError, match="must be <= cols"):  # 16-bit differential: c = 30
        _program(dict(_layer(), cells=torch.zeros(3, 5, 30, dtype=torch.uint8)), B=16)
    with pytest.raises(RuntimeError, match="at most 21"):  # 16-bit, 30 low cells
        ops.program_layer(torch.zeros(1, 1, 30, dtype=torch.uint8), EMPTY_ORDER, EMPTY_ORDER,
                          EMPTY_PIN, *_fresh_pool(1, 30, 1), 0, 1, 30, 16, 1, 0, True, True,
                          15, 0)
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
