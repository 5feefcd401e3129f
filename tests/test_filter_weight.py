"""Rule 25 (docs/semantics.md): filter weights, held to tests/independent.py.

* ``feedback_quantize`` (rule 23) and ``feedback_refine`` (rule 24) with per-filter weights: the
  kernels == the plain-PyTorch reference == the naive simulator, exactly, on hypothesis-drawn
  formats, shapes (empty and odd), groups, chains, held cells, penalties and weights; all-ones
  weights are rules 23 and 24 themselves; the sweeps never raise the weighted objective;
* the layers: with ``filter_weight="scale"`` each layer computes with exactly the integers the
  simulator chooses from the layer's scales (its own median), and they differ from ``"lsb"``'s;
* bad weights reaching the ops and bad config values are refused, naming them.
"""
import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import crossbar_torch as xb
from crossbar_torch import ops
from crossbar_torch.feedback import filter_weights, scaled_moment
from crossbar_torch.ops import feedback_reference as reference

import independent as ind
from test_feedback import Tiny, _case, _chains, _held_rows, _write_aware_case
from test_refine import _case as _refine_case, _expected as _refine_expected

ENCODINGS = ("differential", "twos_complement", "offset")


def _weights(n, seed, spread):
    """Positive filter weights spanning ``spread`` decades (a layer's scales squared do)."""
    g = torch.Generator().manual_seed(seed + 2)
    return (10.0 ** ((torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * spread))


@settings(max_examples=60, deadline=None)
@given(out=st.integers(0, 5), k=st.integers(0, 6), groups=st.sampled_from([1, 2]),
       bits=st.integers(3, 6), b=st.sampled_from([1, 2]), enc=st.integers(0, 2),
       L=st.integers(0, 3), seed=st.integers(0, 2 ** 16),
       penalty=st.sampled_from([0.25, 1.0, 2.5, 40.0]), held_p=st.sampled_from([0.0, 0.5]),
       spread=st.sampled_from([0.0, 1.0, 4.0]))
def test_quantize_kernel_reference_independent_agree(out, k, groups, bits, b, enc, L, seed,
                                                     penalty, held_p, spread):
    b, L, t, u, held, levels, pred, index = _write_aware_case(out, k, groups, bits, b, enc, L,
                                                              seed, held_p)
    a = _weights(out * groups, seed, spread)
    got = ops.feedback_quantize(t, u, held, levels, bits, b, enc, L, pred, index, penalty, a)
    want = reference.feedback_quantize(t, u, held, levels, bits, b, enc, L, pred, index,
                                       penalty, a)
    assert torch.equal(got, want)
    if spread == 0.0:  # all weights 1: rule 23 itself
        plain = ops.feedback_quantize(t, u, held, levels, bits, b, enc, L, pred, index, penalty)
        assert torch.equal(got, plain)
    if t.numel():
        sim = ind.write_aware_layer(t.tolist(), [x.tolist() for x in u],
                                    _held_rows(held, levels), bits, b, ENCODINGS[enc], L,
                                    pred.tolist(), index.tolist(), penalty, a.tolist())
        assert got.tolist() == sim


@settings(max_examples=10, deadline=None)
@given(out=st.integers(33, 48), k=st.integers(1, 6), groups=st.sampled_from([1, 3]),
       link=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 2 ** 16))
def test_quantize_blocks_of_chains_take_each_filters_own_penalty(out, k, groups, link, seed):
    """The CPU kernel steps up to 32 chains through U together: each filter in the block, and
    a filter of another group run on its own, pays its own penalty (the reference's integers)."""
    bits, b, enc, L = 5, 1, 0, 1
    t, u, held, levels = _case(out, k, groups, bits, b, enc, L, seed, 0.4)
    n = out * groups
    pred = _chains(n, seed, link)
    g = torch.Generator().manual_seed(seed + 1)
    index = torch.stack([torch.randperm(k, generator=g) for _ in range(n)])
    a = _weights(n, seed, 3.0)
    got = ops.feedback_quantize(t, u, held, levels, bits, b, enc, L, pred, index, 1.5, a)
    want = reference.feedback_quantize(t, u, held, levels, bits, b, enc, L, pred, index, 1.5, a)
    assert torch.equal(got, want)


def _weighted_objective(t, hs, q, pred, index, bits, b, enc, penalty, a):
    """Rule 25's J, directly: sum_o a[o] d_o^T Hs d_o + penalty * (cells differing from the
    predecessor's at the same sorted position), in float64."""
    n = q.shape[0]
    if not n or not q.shape[1]:
        return 0.0
    per = n // hs.shape[0]
    d = q.double() - t
    err = sum(float(a[o]) * float(d[o] @ hs[o // per] @ d[o]) for o in range(n))
    cells = ops.encode(torch.gather(q, 1, index).contiguous(), bits, b, enc)
    has = pred >= 0
    return err + penalty * int((cells[has] != cells[pred[has]]).sum())


@settings(max_examples=60, deadline=None)
@given(out=st.integers(0, 5), k=st.integers(0, 7), groups=st.sampled_from([1, 2]),
       bits=st.integers(2, 8), b=st.sampled_from([1, 2]), enc=st.integers(0, 2),
       penalty=st.sampled_from([0.3, 1.0, 4.0]), sweeps=st.integers(0, 3),
       spread=st.sampled_from([0.0, 1.0, 4.0]), seed=st.integers(0, 2 ** 16))
def test_refine_kernel_reference_independent_agree(out, k, groups, bits, b, enc, penalty,
                                                   sweeps, spread, seed):
    if b > (bits - 1 if enc == 0 else bits):
        b = 1
    t, hs, q, pred, index = _refine_case(out, k, groups, bits, seed)
    a = _weights(out * groups, seed, spread)
    got = ops.feedback_refine(t, hs, q, pred, index, bits, b, enc, penalty, sweeps, a)
    want = reference.feedback_refine(t, hs, q, pred, index, bits, b, enc, penalty, sweeps, a)
    assert got.dtype == torch.int32 and torch.equal(got, want)
    if spread == 0.0:
        assert torch.equal(got, ops.feedback_refine(t, hs, q, pred, index, bits, b, enc,
                                                    penalty, sweeps))
    sim = ind.refine_layer(t.tolist(), [h.tolist() for h in hs], q.tolist(), bits, b,
                           ENCODINGS[enc], pred.tolist(), index.tolist(), penalty, sweeps,
                           a.tolist())
    assert got.tolist() == sim
    before = _weighted_objective(t, hs, q, pred, index, bits, b, enc, penalty, a)
    after = _weighted_objective(t, hs, got, pred, index, bits, b, enc, penalty, a)
    assert after <= before + 1e-9 * (1 + abs(before))
    if not torch.equal(got, q):
        assert after < before


def test_refine_threads_and_panels_take_each_filters_weight():
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            t, hs, q, _, index = _refine_case(13, 300, 2, 8, 3)
            pred = _chains(26, 4, p=0.9)
            a = _weights(26, 4, 3.0)
            got = ops.feedback_refine(t, hs, q, pred, index, 8, 1, 0, 1.5, 2, a)
            want = reference.feedback_refine(t, hs, q, pred, index, 8, 1, 0, 1.5, 2, a)
            assert torch.equal(got, want)
            assert not torch.equal(got, ops.feedback_refine(t, hs, q, pred, index, 8, 1, 0,
                                                            1.5, 2))
    finally:
        torch.set_num_threads(old)


# ---- the weights and the layers ---------------------------------------------------------------

@pytest.mark.parametrize("scales", [[2.0], [1.0, 4.0], [3.0, 1.0, 2.0, 0.5],
                                    [1e-3, 7.25, 0.1, 0.1, 100.0], [1e-30, 1.0, 1.0, 1e30]])
def test_filter_weights_are_scale_squared_over_the_lower_median(scales):
    s = torch.tensor(scales, dtype=torch.float32)
    assert filter_weights(s).tolist() == ind.filter_weights(s.tolist())
    assert filter_weights(torch.zeros(0)).numel() == 0


def _expected(layer, cfg, weighted):
    """The simulator's integers (rule 23, then rule 24's sweeps), with rule 25's weights
    computed here from the layer's scales, or without them."""
    return _refine_expected(layer, cfg,
                            ind.filter_weights(layer.scale.tolist()) if weighted else None)


class Spread(nn.Module):
    """Tiny's layers with the rows of each weight scaled over two decades: rule 25 has filters
    of very different scales to weigh (as a transformer's FFN output layers do)."""

    def __init__(self):
        super().__init__()
        self.net = Tiny()
        with torch.no_grad():
            for m in self.net.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    rows = m.weight.shape[0]
                    m.weight.mul_(torch.logspace(-1, 1, rows).reshape(-1, *[1] * (m.weight.dim()
                                                                                 - 1)))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("kw", [dict(feedback_sweeps=0), dict(feedback_sweeps=2),
                                dict(feedback_sweeps=2, pool=2, encoding="twos_complement")])
def test_layers_compute_with_the_independent_choice(kw):
    torch.manual_seed(7)
    model = Spread().eval()
    base = dict(rows=8, cols=28, sort="value", filter_order="chain", feedback="hessian",
                feedback_damp=0.1, write_penalty=2.0, seed=3, **kw)
    cfg = xb.CrossbarConfig(filter_weight="scale", **base)
    xmodel = xb.convert(copy.deepcopy(model), cfg)
    xb.calibrate(xmodel, torch.randn(5, 4, 6, 6))
    layers = xb.crossbar_layers(xmodel)
    expected = {name: _expected(layer, cfg, True) for name, layer in layers}
    plain = {name: _expected(layer, cfg, False) for name, layer in layers}
    xb.reprogram(xmodel)
    for name, layer in layers:
        assert torch.equal(layer.effective_q(), expected[name]), name
    # the weights changed choices, so the check above tests them
    assert any(not torch.equal(expected[n], plain[n]) for n in expected)
    report = xb.reprogram_report(xmodel).to_dict()
    assert report["writes_per_pass"] == xb.program_model(xmodel).per_pass.writes


def test_scale_weights_save_writes_where_they_cost_the_output_least():
    """The point of rule 25: on a layer whose filters' scales span two decades, weighing each
    filter's error by its scale squared moves the error onto the filters whose LSB is worth
    least in the output. Against rule 23's LSB weighting at half the penalty, it writes fewer
    cells and its output error (relative, on held-out inputs) is less than half."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(96, 64)).eval()
    with torch.no_grad():
        model[0].weight.mul_(torch.logspace(-1, 1, 64)[:, None])
    x = torch.rand(300, 96) + 0.2
    errors, writes = {}, {}
    for fw, penalty in (("lsb", 2.0), ("scale", 4.0)):
        cfg = xb.CrossbarConfig(rows=32, cols=28, sort="value", filter_order="chain",
                                feedback="hessian", feedback_damp=0.1, write_penalty=penalty,
                                feedback_sweeps=2, filter_weight=fw)
        xm = xb.convert(copy.deepcopy(model), cfg)
        xb.calibrate(xm, x[:200])
        xb.reprogram(xm)
        writes[fw] = xb.reprogram_report(xm).to_dict()["writes_per_pass"]
        with torch.no_grad():
            ref = model(x[200:])
            errors[fw] = float((xm(x[200:]) - ref).norm() / ref.norm())
    assert writes["scale"] < writes["lsb"], writes
    assert errors["scale"] < 0.5 * errors["lsb"], errors


def test_config_and_overrides():
    with pytest.raises(ValueError, match="filter_weight"):
        xb.CrossbarConfig(filter_weight="scale")  # needs feedback
    with pytest.raises(ValueError, match="filter_weight"):
        xb.CrossbarConfig(feedback="hessian", filter_weight="fisher")
    cfg = xb.CrossbarConfig(feedback="hessian", write_penalty=1.0, filter_weight="scale",
                            layer_overrides={"a*": {"filter_weight": "lsb"}})
    assert cfg.baseline().filter_weight == "lsb"
    assert cfg.for_layer("ab").filter_weight == "lsb"
    assert cfg.for_layer("b").filter_weight == "scale"
    with pytest.raises(ValueError, match="filter_weight"):
        xb.CrossbarConfig(feedback="hessian", layer_overrides={"a*": {"filter_weight": "x"}})


def test_bad_weights_reaching_the_ops_are_refused():
    t, u, held, levels = _case(3, 4, 1, 8, 1, 0, 0, 5, 0.0)
    pred = torch.tensor([-1, 0, 1])
    index = torch.stack([torch.randperm(4) for _ in range(3)])
    hs = scaled_moment(torch.eye(4).unsqueeze(0), 0.1)
    q = t.round().int()
    good = torch.ones(3, dtype=torch.float64)
    for bad, what in ((good.float(), "Double"), (good[:2], "out"), (good[None], r"\(out,\)"),
                      (torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64), "in \\["),
                      (torch.tensor([1.0, -2.0, 1.0], dtype=torch.float64), "in \\["),
                      (torch.tensor([1.0, 1e-13, 1.0], dtype=torch.float64), "in \\["),
                      (torch.tensor([1.0, 1e13, 1.0], dtype=torch.float64), "in \\["),
                      (torch.tensor([1.0, float("nan"), 1.0], dtype=torch.float64), "finite"),
                      (torch.tensor([1.0, float("inf"), 1.0], dtype=torch.float64), "finite")):
        with pytest.raises(RuntimeError, match="filter_weight") as e:
            ops.feedback_quantize(t, u, held, levels, 8, 1, 0, 0, pred, index, 1.0, bad)
        assert e.match(what)
        with pytest.raises(RuntimeError, match="filter_weight") as e:
            ops.feedback_refine(t, hs, q, pred, index, 8, 1, 0, 1.0, 1, bad)
        assert e.match(what)


def test_fake_kernels_check_the_weights_shape():
    """The meta (fake) kernels take the weights and refuse a wrong shape or dtype, as torch.compile
    traces the ops."""
    t = torch.empty(4, 6, dtype=torch.float64, device="meta")
    u = torch.empty(1, 6, 6, dtype=torch.float64, device="meta")
    none_b = torch.empty(0, dtype=torch.bool, device="meta")
    none_u = torch.empty(0, dtype=torch.uint8, device="meta")
    pred = torch.empty(4, dtype=torch.int64, device="meta")
    index = torch.empty(4, 6, dtype=torch.int64, device="meta")
    q = torch.empty(4, 6, dtype=torch.int32, device="meta")
    a = torch.empty(4, dtype=torch.float64, device="meta")
    assert ops.feedback_quantize(t, u, none_b, none_u, 8, 1, 0, 0, pred, index, 1.0,
                                 a).is_meta
    assert ops.feedback_refine(t, u, q, pred, index, 8, 1, 0, 1.0, 2, a).is_meta
    for bad in (a[:3], a.float()):
        with pytest.raises(Exception, match="filter_weight"):
            ops.feedback_quantize(t, u, none_b, none_u, 8, 1, 0, 0, pred, index, 1.0, bad)
        with pytest.raises(Exception, match="filter_weight"):
            ops.feedback_refine(t, u, q, pred, index, 8, 1, 0, 1.0, 2, bad)
