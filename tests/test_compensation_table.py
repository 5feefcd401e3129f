"""Rule 13 by table (csrc/cpu/comp_table.cpp) against the direct search and the reference.

The CPU kernels look rule 13 up in a per-format table where d(x) is linear and the table is
small; otherwise (two's complement with no high slice, a value outside the table's range, or
CROSSBAR_TORCH_COMPENSATION_TABLE=0) they search directly. Both paths must give exactly what
ops/reference.py gives: every effective cell, counter and crossbar bit.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crossbar_torch.ops as ops
from crossbar_torch.ops import reference as ref
from tests.test_ops import _gen, _pool_tensors, call_program, random_pinned, random_placement

ENV = "CROSSBAR_TORCH_COMPENSATION_TABLE"


@contextmanager
def direct_search():
    """The kernels skip the table while this is active (read on every call)."""
    before = os.environ.get(ENV)
    os.environ[ENV] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[ENV]
        else:
            os.environ[ENV] = before


@st.composite
def comp_formats(draw):
    """(B, b, encoding, L) with a small search: the table path for most, the direct path for
    two's complement with L == S."""
    B = draw(st.integers(2, 10))
    e = draw(st.integers(0, 2))
    magnitude = B - 1 if e == ref.DIFFERENTIAL else B
    b = draw(st.integers(1, min(3, magnitude)))
    S = ref.slices_for(B, b, e)
    arrays = 2 if e == ref.DIFFERENTIAL else 1
    L = draw(st.integers(1, S).filter(lambda n: arrays * n * b <= 8))
    return B, b, e, L


def random_cells(shape, B, b, e, g, arbitrary):
    """Rule-3 encodings of random q, or (arbitrary) any levels: values the table does not
    cover, so those weights take the direct path."""
    if arbitrary:
        return torch.randint(0, 2 ** b, shape + (ref.cells_for(B, b, e),), generator=g,
                             dtype=torch.uint8)
    qmax = 2 ** (B - 1) - 1
    q = torch.randint(-qmax, qmax + 1, shape, generator=g, dtype=torch.int32)
    return ref.encode(q, B, b, e)


SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(fmt=comp_formats(), rows=st.integers(1, 6), cols=st.sampled_from([20, 64, 100, 130]),
       out=st.integers(1, 12), k_rows=st.integers(1, 3), stuck_p=st.sampled_from([0.3, 1.0]),
       stuck_initial=st.booleans(), pinned=st.sampled_from([0.0, 0.5]),
       arbitrary=st.booleans(), window=st.sampled_from([0, 3]),
       seed=st.integers(0, 2**31 - 1))
def test_program_layer_table_and_direct_match_reference(fmt, rows, cols, out, k_rows, stuck_p,
                                                       stuck_initial, pinned, arbitrary, window,
                                                       seed):
    B, b, e, L = fmt
    c = ref.cells_for(B, b, e)
    if cols < c:
        cols = c
    g = _gen(seed)
    pool = _pool_tensors(2, rows, cols, b, g, stuck_p, True)
    cells = random_cells((out, k_rows * rows), B, b, e, g, arbitrary)
    kw = dict(stuck_initial=stuck_initial, index=random_placement(out, cols // c, g, True),
              pinned=random_pinned(cells.shape, b, g, pinned) if pinned else None, comp=L,
              window=window)
    results = []
    for impl, env in ((ref.program_layer, False), (ops.program_layer, False),
                      (ops.program_layer, True)):
        tensors = [t.clone() for t in pool]
        if env:
            with direct_search():
                res = call_program(impl, cells, tensors, 1, rows, cols, B, b, e, **kw)
        else:
            res = call_program(impl, cells, tensors, 1, rows, cols, B, b, e, **kw)
        results.append((res, tensors))
    (want, want_pool), *got = results
    for res, tensors in got:
        for x, y in zip(res, want):
            assert torch.equal(x, y)
        for x, y in zip(tensors, want_pool):
            assert torch.equal(x, y)


@SETTINGS
@given(fmt=comp_formats(), n=st.integers(1, 60), arbitrary=st.booleans(),
       p_held=st.sampled_from([0.3, 0.9]), seed=st.integers(0, 2**31 - 1))
def test_compensate_op_table_and_direct_match_reference(fmt, n, arbitrary, p_held, seed):
    B, b, e, L = fmt
    g = _gen(seed)
    cells = random_cells((n,), B, b, e, g, arbitrary)
    old = torch.randint(0, 2 ** b, cells.shape, generator=g, dtype=torch.uint8)
    # held cells anywhere, high slices too (compensate_slices need not match the stuck slices)
    held = torch.rand(cells.shape, generator=g) < p_held
    want = ref.compensate(cells, held, old, B, b, e, L)
    assert torch.equal(ops.compensate(cells, held, old, B, b, e, L), want)
    with direct_search():
        assert torch.equal(ops.compensate(cells, held, old, B, b, e, L), want)


def test_table_covers_the_benchmarked_formats():
    """8-bit differential, 1-bit cells, L = 1 and 2: the values rule 3 writes are all inside the
    table, so a layer of them gives the same result with the table switched off (the table
    path is the one taken; a fallback to the direct search would pass too, so this test pins
    exactness, and the benchmark pins speed)."""
    g = _gen(5)
    B, b, e, rows, cols = 8, 1, ref.DIFFERENTIAL, 16, 128
    for L in (1, 2):
        cells = random_cells((40, 48), B, b, e, g, False)
        pool = _pool_tensors(1, rows, cols, b, g, 0.0, False)
        pool = (pool[0], pool[1], ref.pack_bits(
            (torch.arange(cols) % ref.cells_for(B, b, e) % ref.slices_for(B, b, e) < L)
            .expand(1, rows, cols)), pool[3])
        first = [t.clone() for t in pool]
        call_program(ops.program_layer, cells, first, 0, rows, cols, B, b, e, comp=L)
        a, b_ = [t.clone() for t in first], [t.clone() for t in first]
        res_a = call_program(ops.program_layer, cells, a, 0, rows, cols, B, b, e, comp=L)
        with direct_search():
            res_b = call_program(ops.program_layer, cells, b_, 0, rows, cols, B, b, e, comp=L)
        res_r = call_program(ref.program_layer, cells, [t.clone() for t in first], 0, rows,
                             cols, B, b, e, comp=L)
        for x, y, z in zip(res_a, res_b, res_r):
            assert torch.equal(x, y) and torch.equal(x, z)
