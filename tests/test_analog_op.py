"""The compiled ``analog_matmul`` op (csrc/cpu/analog_matmul_kernel.cpp) agrees exactly with the
plain-PyTorch reference (crossbar_torch/ops/analog_reference.py, docs/semantics.md rules 17 and
18), checks its arguments, and traces through its fake kernel.

Exactness: the kernel adds each partial sum over the section's rows in order, the reference
with torch's vectorized sum; they agree bit for bit whenever every such sum is exact, which the
tests arrange with conductances (and, for the ideal DAC, inputs) that are small multiples of
1/64. Everything after the sums (ADC, offsets, the shift and add) is elementwise in the same
order in both, so steps, cell weights, g0 and the encoding offset may be any floats.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crossbar_torch.ops as ops
from crossbar_torch.ops import analog_reference as aref

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

ARG_NAMES = ("x", "g", "sort_index", "cell_weight", "adc_steps", "groups", "rows", "input_bits",
             "input_bits_per_cycle", "input_scale", "adc_bits", "g0", "encoding_offset",
             "signed_weights")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _perm(out, K, g):
    if out == 0 or K == 0:
        return torch.zeros(out, K, dtype=torch.int64)
    return torch.argsort(torch.rand(out, K, generator=g), dim=1)


def make_args(N, out, groups, K, rows, c, input_bits, per_cycle, adc_bits, signed, g0=0.0,
              offset=0.0, seed=0, ties=False, relu=False, scale=None, steps=None):
    """A call of analog_matmul (dict of its arguments) with exact partial sums."""
    gen = _gen(seed)
    if signed:
        g = torch.randint(-4 * 64, 4 * 64, (out, c, K), generator=gen) / 64.0
    else:
        g = torch.randint(0, 4 * 64, (out, c, K), generator=gen) / 64.0
    if input_bits == 0:
        x = torch.randint(-8 * 64, 8 * 64, (N, groups * K), generator=gen) / 64.0
        scale = 1.0
    else:
        if scale is None:
            scale = float(torch.empty(()).uniform_(0.01, 2.0, generator=gen))
        if ties:  # x / scale exactly on halves: round half to even decides
            scale = 2.0 ** int(torch.randint(-4, 3, (), generator=gen))
            x = torch.randint(-2 ** (input_bits + 1) - 4, 2 ** (input_bits + 1) + 5,
                              (N, groups * K), generator=gen) * 0.5 * scale
        else:
            x = torch.randn(N, groups * K, generator=gen) * scale * 2 ** (input_bits - 1)
    if relu:
        x = x.clamp(min=0)
    cw = torch.randint(-3, 9, (c,), generator=gen).double()
    cw = torch.where(torch.rand(c, generator=gen) < 0.5, 2.0 ** cw, -(2.0 ** cw))
    if steps is None:
        steps = torch.where(torch.rand(c, generator=gen) < 0.5,
                            2.0 ** torch.randint(-3, 5, (c,), generator=gen).double(),
                            torch.rand(c, generator=gen, dtype=torch.float64) * 5 + 0.01)
    return dict(x=x.float(), g=g.float(), sort_index=_perm(out, K, gen), cell_weight=cw,
                adc_steps=steps, groups=groups, rows=rows, input_bits=input_bits,
                input_bits_per_cycle=per_cycle, input_scale=scale, adc_bits=adc_bits, g0=g0,
                encoding_offset=offset, signed_weights=signed)


def call(a, fn=ops.analog_matmul):
    return fn(*[a[k] for k in ARG_NAMES])


def assert_matches_reference(a):
    acc, pmax = call(a)
    racc, rpmax = call(a, aref.analog_matmul)
    assert acc.dtype == torch.float64 and pmax.dtype == torch.float64
    assert acc.shape == racc.shape and pmax.shape == rpmax.shape
    assert torch.equal(acc, racc), (acc - racc).abs().max()
    assert torch.equal(pmax, rpmax), (pmax, rpmax)


@st.composite
def analog_calls(draw):
    signed = draw(st.booleans())
    groups = draw(st.integers(1, 3))
    input_bits = draw(st.integers(1, 12)) if signed else draw(
        st.one_of(st.just(0), st.integers(1, 12)))
    return make_args(
        N=draw(st.integers(0, 6)), out=groups * draw(st.integers(0, 4)), groups=groups,
        K=draw(st.integers(1, 9)), rows=draw(st.integers(1, 5)),
        c=1 if signed else draw(st.integers(1, 5)), input_bits=input_bits,
        per_cycle=draw(st.integers(1, 16)),
        adc_bits=draw(st.one_of(st.just(0), st.integers(1, 16))), signed=signed,
        g0=draw(st.one_of(st.just(0.0), st.floats(0, 4))),
        offset=draw(st.one_of(st.just(0.0), st.floats(-200, 200))),
        seed=draw(st.integers(0, 2**31 - 1)), ties=draw(st.booleans()),
        relu=draw(st.booleans()))


@SETTINGS
@given(a=analog_calls())
def test_matches_reference(a):
    assert_matches_reference(a)


@pytest.mark.parametrize("kw", [
    # the benchmark's shape, smaller: 8-bit differential 1-bit cells, 6-bit ADC
    dict(N=37, out=24, groups=1, K=150, rows=64, c=14, input_bits=8, per_cycle=1, adc_bits=6,
         signed=False, g0=0.5, offset=0.0),
    # grouped, 2 bits per cycle, ReLU inputs (negative pass all zero), offset encoding
    dict(N=21, out=18, groups=3, K=47, rows=16, c=4, input_bits=7, per_cycle=2, adc_bits=5,
         signed=False, g0=0.0, offset=64.0, relu=True),
    # many filters, one input row: the filters are split across threads
    dict(N=1, out=64, groups=1, K=400, rows=128, c=14, input_bits=8, per_cycle=1, adc_bits=7,
         signed=False),
    # adc_scope "weight": one signed cycle, signed ADC
    dict(N=50, out=20, groups=2, K=90, rows=32, c=1, input_bits=8, per_cycle=1, adc_bits=6,
         signed=True),
    # a long dot product: one input row per block
    dict(N=3, out=2, groups=1, K=40000, rows=30000, c=2, input_bits=8, per_cycle=1,
         adc_bits=18, signed=False, offset=1.5),
    # ideal DAC
    dict(N=30, out=12, groups=1, K=70, rows=25, c=3, input_bits=0, per_cycle=1, adc_bits=4,
         signed=False, g0=1.0, offset=-3.5),
])
def test_larger_layers_match_reference(kw):
    assert_matches_reference(make_args(seed=7, **kw))


def test_same_result_on_any_thread_count():
    a = make_args(N=40, out=48, groups=2, K=70, rows=32, c=14, input_bits=8, per_cycle=1,
                  adc_bits=6, signed=False, seed=3)
    a["g"] = torch.rand(a["g"].shape, generator=_gen(1)) * 3  # inexact sums: order matters
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = call(a)
        torch.set_num_threads(2)
        two = call(a)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    ref = call(a, aref.analog_matmul)  # and close to the reference when sums round
    torch.testing.assert_close(one[0], ref[0], rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(one[1], ref[1], rtol=1e-12, atol=0)


@pytest.mark.parametrize("input_bits, per_cycle", [(8, 1), (8, 3), (5, 16), (0, 1)])
def test_lossless_adc_equals_no_adc(input_bits, per_cycle):
    """Integer conductances and digits give integer partial sums below 2**24: a 24-bit ADC with
    step 1 returns them unchanged."""
    a = make_args(N=9, out=6, groups=1, K=40, rows=16, c=4, input_bits=input_bits,
                  per_cycle=per_cycle, adc_bits=0, signed=False, g0=2.0, offset=5.0, seed=11)
    a["g"] = a["g"].round()
    if input_bits == 0:
        a["x"] = a["x"].round()
    ideal = call(a)
    a.update(adc_bits=24, adc_steps=torch.ones(4, dtype=torch.float64))
    lossless = call(a)
    assert torch.equal(ideal[0], lossless[0]) and torch.equal(ideal[1], lossless[1])


@pytest.mark.parametrize("signed", [False, True])
def test_no_adc_is_the_linear_product(signed):
    """Rule 20: without an ADC the shift and add is linear, acc = xq . W_g - offset * sum xq
    with W_g[o, k] = sum_i w_i * (g[o, i, k] - g0), computed here independently."""
    a = make_args(N=7, out=6, groups=2, K=13, rows=4, c=1 if signed else 5, input_bits=6,
                  per_cycle=2, adc_bits=0, signed=signed, g0=0.0 if signed else 0.75,
                  offset=3.0, seed=5)
    acc, _ = call(a)
    xq = torch.clamp(torch.round(a["x"] / torch.tensor(a["input_scale"])), -63, 63).double()
    per_group, K = 3, 13
    want = torch.zeros(7, 6, dtype=torch.float64)
    for o in range(6):
        first = (o // per_group) * K  # the group's first input column
        wg = ((a["g"][o].double() - a["g0"]) * a["cell_weight"][:, None]).sum(0)  # (K,)
        want[:, o] = xq[:, first + a["sort_index"][o]] @ wg - 3.0 * xq[:, first:first + K].sum(1)
    assert torch.equal(acc, want)


def test_by_hand():
    """One weight, one row: acc = w * ADC(g * xq) per pass and cycle, worked out by hand."""
    one = torch.ones(1, 1, dtype=torch.float64)
    base = dict(g=torch.tensor([[[3.0]]]), sort_index=torch.zeros(1, 1, dtype=torch.int64),
                cell_weight=torch.ones(1, dtype=torch.float64), groups=1, rows=1,
                input_bits=4, input_bits_per_cycle=4, input_scale=0.5, adc_bits=0, g0=0.0,
                encoding_offset=0.0, signed_weights=False)
    x = torch.tensor([[0.25], [0.75], [1.25], [-0.25], [-1.25], [100.0], [-100.0]])
    # x / 0.5 = 0.5, 1.5, 2.5, -0.5, -2.5, 200, -200 -> half to even, clamp to +-15
    xq = torch.tensor([0.0, 2, 2, 0, -2, 15, -15], dtype=torch.float64)[:, None]
    acc, pmax = call(dict(base, x=x, adc_steps=one[0]))
    assert torch.equal(acc, 3 * xq)
    assert pmax.tolist() == [45.0]
    # 1 bit per cycle, 3-bit ADC with step 2: each cycle's P = 3 * bit -> ADC 2 or 4 (half to
    # even: 3 / 2 = 1.5 -> 2 -> 4); 15 = 1111b -> 4 * (1 + 2 + 4 + 8) = 60
    acc, pmax = call(dict(base, x=x, input_bits_per_cycle=1, adc_bits=3,
                          adc_steps=torch.full((1,), 2.0, dtype=torch.float64)))
    assert acc[:, 0].tolist() == [0.0, 8.0, 8.0, 0.0, -8.0, 60.0, -60.0]
    assert pmax.tolist() == [3.0]
    # signed (adc_scope "weight"), 3-bit signed ADC: codes in [-3, 3], step 4: P = 3 * xq
    acc, pmax = call(dict(base, x=x, g=torch.tensor([[[-3.0]]]), signed_weights=True,
                          adc_bits=3, adc_steps=torch.full((1,), 4.0, dtype=torch.float64)))
    # P = -3 * xq = 0, -6, -6, 0, 6, -45, 45 -> codes 0, -2 (-1.5), -2, 0, 2, -3, 3
    assert acc[:, 0].tolist() == [0.0, -8.0, -8.0, 0.0, 8.0, -12.0, 12.0]
    assert pmax.tolist() == [45.0]
    # unsigned 2-bit ADC clamps at 3 codes; g0 = 1 subtracts the digit sum
    acc, _ = call(dict(base, x=x[5:6], adc_bits=2, g0=1.0, adc_steps=one[0]))
    assert acc.tolist() == [[3.0 - 15.0]]


def test_empty_and_degenerate():
    for N, out, K in [(0, 4, 3), (5, 0, 3), (0, 0, 2), (3, 2, 0)]:
        a = make_args(N=N, out=out, groups=1, K=K, rows=2, c=3, input_bits=4, per_cycle=1,
                      adc_bits=3, signed=False, offset=2.0)
        acc, pmax = call(a)
        assert acc.shape == (N, out) and pmax.shape == (3,)
        assert not acc.any() and not pmax.any()
        assert_matches_reference(a)
    a = make_args(N=3, out=2, groups=1, K=4, rows=2, c=0, input_bits=4, per_cycle=1,
                  adc_bits=3, signed=False, offset=2.0)
    assert_matches_reference(a)


def test_non_contiguous_and_expanded_inputs():
    a = make_args(N=9, out=8, groups=2, K=11, rows=4, c=3, input_bits=5, per_cycle=2,
                  adc_bits=4, signed=False, seed=2)
    expect = call(a)
    b = dict(a, x=a["x"].t().contiguous().t(), g=a["g"].transpose(0, 2).contiguous()
             .transpose(0, 2), sort_index=a["sort_index"].t().contiguous().t(),
             cell_weight=torch.stack([a["cell_weight"], a["cell_weight"]], 1)[:, 0],
             adc_steps=torch.stack([a["adc_steps"], a["adc_steps"]], 1)[:, 0])
    assert not b["x"].is_contiguous() and not b["g"].is_contiguous()
    got = call(b)
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])
    c = dict(a, x=a["x"][:1].expand(9, -1))
    assert_matches_reference(c)


def test_adc_steps_ignored_without_adc():
    a = make_args(N=3, out=2, groups=1, K=4, rows=2, c=2, input_bits=4, per_cycle=1,
                  adc_bits=0, signed=False)
    expect = call(a)
    a["adc_steps"] = torch.tensor([0.0, float("nan")], dtype=torch.float64)
    got = call(a)
    assert torch.equal(got[0], expect[0])


# ---- errors ---------------------------------------------------------------------------------

def _valid():
    return make_args(N=3, out=4, groups=2, K=5, rows=2, c=2, input_bits=4, per_cycle=1,
                     adc_bits=3, signed=False, seed=1)


def _poke(name, index, value):
    def mutate(a):
        t = a[name].clone()
        t[index] = value
        a[name] = t
    return mutate


def _set(**kw):
    return lambda a: a.update(kw)


BAD = [
    (_set(x=torch.zeros(3, 10, dtype=torch.float64)), "x must be Float"),
    (_set(g=torch.zeros(4, 2, 5, dtype=torch.float64)), "g must be Float"),
    (_set(sort_index=torch.zeros(4, 5, dtype=torch.int32)), "sort_index must be Long"),
    (_set(cell_weight=torch.ones(2)), "cell_weight must be Double"),
    (_set(adc_steps=torch.ones(2)), "adc_steps must be Double"),
    (_set(x=torch.zeros(30)), "x must have"),
    (_set(g=torch.zeros(4, 10)), "g must have"),
    (_set(sort_index=torch.zeros(20, dtype=torch.int64)), "sort_index must have"),
    (_set(cell_weight=torch.ones(2, 1, dtype=torch.float64)), "cell_weight must have"),
    (_set(adc_steps=torch.ones(1, 2, dtype=torch.float64)), "adc_steps must have"),
    (_set(x=torch.zeros(3, 9)), r"x.size\(1\) must equal groups \* K"),
    (_set(sort_index=torch.zeros(4, 4, dtype=torch.int64)), r"sort_index.size\(1\)"),
    (_set(sort_index=torch.zeros(3, 5, dtype=torch.int64)), r"sort_index.size\(0\)"),
    (_set(cell_weight=torch.ones(3, dtype=torch.float64)), r"cell_weight.size\(0\)"),
    (_set(adc_steps=torch.ones(1, dtype=torch.float64)), r"adc_steps.size\(0\)"),
    (_poke("sort_index", (2, 1), 5), "sort_index entries must be in"),
    (_poke("sort_index", (0, 0), -1), "sort_index entries must be in"),
    (_poke("x", (1, 3), float("nan")), r"x contains NaN or Inf \(x\[1, 3\]"),
    (_poke("x", (2, 9), float("-inf")), "x contains NaN or Inf"),
    (_poke("g", (3, 1, 4), float("inf")), "g contains NaN or Inf"),
    (_poke("cell_weight", 1, float("nan")), "cell_weight contains NaN or Inf"),
    (_poke("adc_steps", 0, 0.0), "adc_steps must be > 0"),
    (_poke("adc_steps", 1, -2.0), "adc_steps must be > 0"),
    (_poke("adc_steps", 1, float("inf")), "adc_steps contains NaN or Inf"),
    (_set(groups=0), "groups must be >= 1"),
    (_set(groups=3, x=torch.zeros(3, 15)), "groups = 3 must divide out"),
    (_set(groups=2**62), "groups"),
    (_set(rows=0), "rows must be >= 1"),
    (_set(input_bits=-1), "input_bits must be in"),
    (_set(input_bits=17), "input_bits must be in"),
    (_set(input_bits_per_cycle=0), "input_bits_per_cycle must be in"),
    (_set(input_bits_per_cycle=17), "input_bits_per_cycle must be in"),
    (_set(input_scale=0.0), "input_scale must be"),
    (_set(input_scale=-1.0), "input_scale must be"),
    (_set(input_scale=float("inf")), "input_scale must be"),
    (_set(input_scale=float("nan")), "input_scale must be"),
    (_set(input_scale=1e-50), "input_scale must be"),  # 0 in float32
    (_set(input_scale=1e39), "input_scale must be"),  # inf in float32
    (_set(adc_bits=-1), "adc_bits must be in"),
    (_set(adc_bits=25), "adc_bits must be in"),
    (_set(g0=-0.5), "g0 must be"),
    (_set(g0=float("nan")), "g0 must be"),
    (_set(g0=float("inf")), "g0 must be"),
    (_set(encoding_offset=float("inf")), "encoding_offset must be finite"),
    (_set(encoding_offset=float("nan")), "encoding_offset must be finite"),
    (_set(signed_weights=True), "signed_weights needs one cell"),
    (_set(signed_weights=True, g=torch.zeros(4, 1, 5), cell_weight=torch.ones(1).double(),
          adc_steps=torch.ones(1).double(), input_bits=0), "signed_weights needs quantized"),
]
# the checks that need no data: the fake kernel makes them too
METADATA = [i for i, (_, m) in enumerate(BAD)
            if not any(w in m for w in ("contains", "entries", "adc_steps must be >"))]


@pytest.mark.parametrize("mutate, match", BAD)
def test_bad_arguments_are_named(mutate, match):
    a = _valid()
    call(a)  # valid before the change
    mutate(a)
    with pytest.raises(RuntimeError, match=match):
        call(a)


@pytest.mark.parametrize("i", METADATA)
def test_fake_kernel_refuses_the_same(i):
    mutate, match = BAD[i]
    a = _valid()
    mutate(a)
    a = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in a.items()}
    with pytest.raises(RuntimeError, match=match):
        call(a)


def test_input_scale_ignored_with_ideal_dac():
    a = make_args(N=3, out=2, groups=1, K=4, rows=2, c=2, input_bits=0, per_cycle=1,
                  adc_bits=3, signed=False)
    expect = call(a)
    a["input_scale"] = 0.0
    assert torch.equal(call(a)[0], expect[0])


def _cpu_kernel(*args):
    op = torch.ops.crossbar_torch.analog_matmul.default
    return op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args)


@pytest.mark.parametrize("name", ["g", "sort_index", "cell_weight", "adc_steps"])
def test_device_mismatch_names_the_tensor(name):
    a = _valid()
    a[name] = a[name].to("meta")
    with pytest.raises(RuntimeError, match=f"{name} is on meta but x is on cpu"):
        _cpu_kernel(*[a[k] for k in ARG_NAMES])
    with pytest.raises(RuntimeError, match="same device"):  # the dispatcher picks the fake
        call(a)


def test_huge_sizes_are_refused():
    a = _valid()
    a["x"] = torch.zeros(1, 10).expand(2**40, 10)  # stride 0: no memory behind it
    a["g"] = torch.zeros(1, 2, 5).expand(2**24, 2, 5)
    a["sort_index"] = torch.zeros(1, 5, dtype=torch.int64).expand(2**24, 5)
    with pytest.raises(RuntimeError, match="overflows int64"):
        call(a)


# ---- fake kernel, torch.compile --------------------------------------------------------------

def test_fake_tensor_mode_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    a = make_args(N=5, out=6, groups=3, K=4, rows=3, c=7, input_bits=4, per_cycle=1,
                  adc_bits=3, signed=False)
    with FakeTensorMode() as mode:
        fa = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in a.items()}
        acc, pmax = call(fa)
        assert acc.shape == (5, 6) and acc.dtype == torch.float64
        assert pmax.shape == (7,) and pmax.dtype == torch.float64
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in a.items()}
    acc, pmax = call(meta)
    assert acc.is_meta and acc.shape == (5, 6) and pmax.shape == (7,)


def test_torch_compile_fullgraph_equals_eager():
    a = make_args(N=6, out=4, groups=2, K=9, rows=4, c=3, input_bits=6, per_cycle=2,
                  adc_bits=5, signed=False, g0=0.5, offset=2.0, seed=4)
    scalars = {k: a[k] for k in ARG_NAMES[5:]}

    def f(x, g, sort_index, cell_weight, adc_steps):
        acc, pmax = ops.analog_matmul(x, g, sort_index, cell_weight, adc_steps, **scalars)
        return acc * 2, pmax

    eager = f(a["x"], a["g"], a["sort_index"], a["cell_weight"], a["adc_steps"])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(a["x"], a["g"], a["sort_index"], a["cell_weight"], a["adc_steps"])
    assert torch.equal(got[0], eager[0]) and torch.equal(got[1], eager[1])


def test_opcheck():
    a = make_args(N=4, out=4, groups=2, K=5, rows=2, c=3, input_bits=4, per_cycle=1,
                  adc_bits=3, signed=False, g0=0.25)
    torch.library.opcheck(torch.ops.crossbar_torch.analog_matmul.default,
                          tuple(a[k] for k in ARG_NAMES))


def test_reference_adc_step_rule():
    """The reference's step helper follows rule 18: 2**(e - A), e the smallest with 2**e > R."""
    assert aref.adc_step(100.0, 6) == 2.0 ** (7 - 6)
    assert aref.adc_step(128.0, 6) == 2.0 ** (8 - 6)
    assert aref.adc_step(127.9, 8, signed=True) == 2.0 ** (7 - 7)
    assert aref.adc_step(0.0, 4) == 2.0 ** (1 - 4)
    assert aref.adc_step(0.3, 2) == 2.0 ** (-1 - 2)
    for r in (1e-320, 3e-9, 5.0, 1e30):  # frexp: r = m * 2**E, 0.5 <= m < 1, so e = E
        assert aref.adc_step(r, 8) == 2.0 ** (math.frexp(r)[1] - 8)
