"""Rule 21 (docs/semantics.md): error-feedback programming, held to tests/independent.py.

* the ``feedback_quantize`` kernel == the plain-PyTorch reference == the naive simulator, exactly,
  on hypothesis-drawn formats, shapes (empty and odd), groups and held cells;
* the layers: after ``calibrate`` + ``reprogram`` each layer computes with exactly the integers
  the simulator chooses from its latent weight, its held cells and its input moment; the input
  moment is E[x x^T] of what the crossbars read; the output error falls against rule 13 alone.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import crossbar_torch as xb
from crossbar_torch import ops
from crossbar_torch import feedback
from crossbar_torch.feedback import feedback_factor
from crossbar_torch.threads import one_thread
from crossbar_torch.encoding import cells_for, slices_for
from crossbar_torch.ops import feedback_reference as reference

import independent as ind

ENCODINGS = ("differential", "twos_complement", "offset")


def _case(draw_out, draw_k, groups, bits, b, enc_id, L, seed, held_p=0.4):
    g = torch.Generator().manual_seed(seed)
    c = cells_for(bits, b, enc_id)
    S = slices_for(bits, b, enc_id)
    out = draw_out * groups
    x = torch.randn(3 * draw_k + 2, groups, draw_k, generator=g, dtype=torch.float64)
    if draw_k:
        x[:, :, 0] += 1.0  # correlated inputs, so the feedback matters
    h = torch.einsum("ngk,ngl->gkl", x, x).float() / x.shape[0]
    u = feedback_factor(h, 0.01)
    qmax = 2 ** (bits - 1) - 1
    t = torch.randn(out, draw_k, generator=g, dtype=torch.float64) * qmax / 2
    low = (torch.arange(c) % S) < L
    held = (torch.rand(out, draw_k, c, generator=g) < held_p) & low
    levels = torch.randint(0, 2 ** b, (out, draw_k, c), generator=g, dtype=torch.uint8)
    return t, u, held, levels


def _independent(t, u, held, levels, bits, b, enc_id, L):
    enc = ENCODINGS[enc_id]
    out, k = t.shape
    groups = u.shape[0]
    result = []
    for o in range(out):
        uo = u[o // (out // groups)].tolist()
        cells = [[lv if h else None for h, lv in zip(hr, lr)]
                 for hr, lr in zip(held[o].tolist(), levels[o].tolist())]
        result.append(ind.feedback_row(t[o].tolist(), uo, cells, bits, b, enc, L))
    return torch.tensor(result, dtype=torch.int32).reshape(out, k)


@settings(max_examples=60, deadline=None)
@given(out=st.integers(0, 4), k=st.integers(0, 7), groups=st.sampled_from([1, 2]),
       bits=st.integers(3, 6), b=st.sampled_from([1, 2]), enc=st.integers(0, 2),
       L=st.integers(0, 3), seed=st.integers(0, 2 ** 16))
def test_kernel_reference_independent_agree(out, k, groups, bits, b, enc, L, seed):
    S = slices_for(bits, b, enc)
    L = min(L, S - 1) if S > 1 else 0  # rule 21 needs a high slice to restrict the range
    if b > (bits - 1 if enc == 0 else bits):
        b = 1
        S = slices_for(bits, b, enc)
        L = min(L, S - 1)
    t, u, held, levels = _case(out, k, groups, bits, b, enc, L, seed)
    got = ops.feedback_quantize(t, u, held, levels, bits, b, enc, L)
    assert got.dtype == torch.int32 and got.shape == t.shape
    assert torch.equal(got, reference.feedback_quantize(t, u, held, levels, bits, b, enc, L))
    if t.numel():
        assert torch.equal(got, _independent(t, u, held, levels, bits, b, enc, L))


@pytest.mark.parametrize("bits, b, enc, L", [(8, 1, 0, 1), (8, 2, 1, 2), (6, 1, 2, 3),
                                             (7, 2, 0, 1), (6, 1, 1, 1), (12, 1, 0, 7),
                                             (10, 1, 2, 2), (9, 1, 0, 2), (5, 1, 2, 2),
                                             (16, 2, 0, 5)])
def test_every_low_cell_held_as_stucking_at_p_zero_leaves_them(bits, b, enc, L):
    """p = 0 holds every low cell: each weight has one assignment of its low cells, which the
    CPU kernel decodes for a whole filter before the filter's walk (and a few weights hold
    none, the rounding path): across 32-filter sets and 32-column blocks, the reference's and
    the independent simulator's integers. The formats read the held flags 8 at a time with
    and without an overlapping last 8 (c = 14, 22, 10, 16, 5 cells), and decode the low cells
    by table (up to 12 bits of low levels) or cell by cell (14 and 20 bits: 12 / 1 / 0 / 7,
    16 / 2 / 0 / 5)."""
    t, u, held, levels = _case(37, 70, 1, bits, b, enc, L, 11, held_p=1.0)
    held[3, ::5] = False  # weights whose cells are all free
    got = ops.feedback_quantize(t, u, held, levels, bits, b, enc, L)
    assert torch.equal(got, reference.feedback_quantize(t, u, held, levels, bits, b, enc, L))
    assert torch.equal(got, _independent(t, u, held, levels, bits, b, enc, L))


@pytest.mark.parametrize("enc", [0, 1, 2])
def test_every_slice_held_decodes_what_the_cells_hold(enc):
    """L == S: no high part; a weight whose cells are all held has one value (which may lie
    outside [-qmax, qmax] for two's complement / offset: rule 9 never clamps)."""
    bits, b = 4, 1
    S = slices_for(bits, b, enc)
    c = cells_for(bits, b, enc)
    t = torch.tensor([[0.3, -5.0, 6.6]], dtype=torch.float64)
    u = torch.eye(3, dtype=torch.float64)[None]
    held = torch.ones(1, 3, c, dtype=torch.bool)
    levels = torch.randint(0, 2, (1, 3, c), dtype=torch.uint8, generator=torch.Generator().manual_seed(enc))
    got = ops.feedback_quantize(t, u, held, levels, bits, b, enc, S)
    want = ops.decode(levels, bits, b, enc)
    assert torch.equal(got, want.to(torch.int32))


def test_identity_moment_without_held_cells_is_rule_2():
    """H = I: no feedback between inputs; every weight is round-half-even of W / s (rule 2)."""
    w = torch.randn(5, 9) * 0.1
    q, s = ind.quantize_rows(w.numpy(), 8)
    t = (w / torch.tensor(s)[:, None]).double()
    u = torch.eye(9, dtype=torch.float64)[None] / np.sqrt(1.01)
    got = ops.feedback_quantize(t, u, torch.zeros(0, dtype=torch.bool),
                                torch.zeros(0, dtype=torch.uint8), 8, 1, 0, 0)
    assert got.tolist() == q


def test_bad_arguments_are_refused():
    t = torch.zeros(2, 3, dtype=torch.float64)
    u = torch.eye(3, dtype=torch.float64)[None]
    none_b, none_u = torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="target must be Double"):
        ops.feedback_quantize(t.float(), u, none_b, none_u, 8, 1, 0, 0)
    with pytest.raises(RuntimeError, match="target holds NaN"):
        ops.feedback_quantize(t.clone().fill_(float("nan")), u, none_b, none_u, 8, 1, 0, 0)
    with pytest.raises(RuntimeError, match="diagonal of u must be positive"):
        ops.feedback_quantize(t, -u, none_b, none_u, 8, 1, 0, 0)
    with pytest.raises(RuntimeError, match="multiple of the groups"):
        ops.feedback_quantize(t, u.expand(3, 3, 3).contiguous(), none_b, none_u, 8, 1, 0, 0)
    with pytest.raises(RuntimeError, match="held.size"):
        ops.feedback_quantize(t, u, torch.zeros(2, 4, 14, dtype=torch.bool),
                              torch.zeros(2, 4, 14, dtype=torch.uint8), 8, 1, 0, 1)
    with pytest.raises(RuntimeError, match="levels"):
        ops.feedback_quantize(t, u, torch.zeros(2, 3, 14, dtype=torch.bool),
                              torch.full((2, 3, 14), 2, dtype=torch.uint8), 8, 1, 0, 1)


def test_fake_kernel_shapes():
    t = torch.empty(4, 6, dtype=torch.float64, device="meta")
    u = torch.empty(2, 6, 6, dtype=torch.float64, device="meta")
    h = torch.empty(4, 6, 14, dtype=torch.bool, device="meta")
    lv = torch.empty(4, 6, 14, dtype=torch.uint8, device="meta")
    out = ops.feedback_quantize(t, u, h, lv, 8, 1, 0, 1)
    assert out.shape == (4, 6) and out.dtype == torch.int32 and out.is_meta
    # a layer's packed buffers: 14 flags in 2 bytes, 14 one-bit levels in 2
    flags = torch.empty(4, 6, 2, dtype=torch.uint8, device="meta")
    index = torch.empty(4, 6, dtype=torch.int64, device="meta")
    q, run = ops.feedback_quantize(t, u, flags, flags, 8, 1, 0, 1, sort_index=index,
                                   running=True)
    assert q.shape == run.shape == (4, 6) and q.dtype == torch.int32 and run.is_meta
    with pytest.raises(RuntimeError, match="held must be empty or"):
        ops.feedback_quantize(t, u, lv, lv, 8, 1, 0, 1, sort_index=index)


# ---- the layers --------------------------------------------------------------------------------

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.fc1 = nn.Linear(6 * 4, 20)
        self.fc2 = nn.Linear(20, 7)

    def forward(self, x):
        y = torch.relu(self.conv(x)).mean((2, 3), keepdim=True)
        y = y.repeat(1, 4, 1, 1).flatten(1)
        return self.fc2(torch.nn.functional.gelu(self.fc1(y)))


def _config(**kw):
    base = dict(rows=8, cols=28, sort="value", filter_order="chain", stuck_slices=1,
                reprogram_fraction=0.3, compensate=True, feedback="hessian", seed=3)
    base.update(kw)
    return xb.CrossbarConfig(**base)


def _expected(layer, cfg):
    """The simulator's rule-21 integers of one layer, from its latent weight, scales, input
    moment and the held cells (stuck, at their levels) it holds before the programming."""
    w = layer.matrix_weight().detach().float()
    t = (w / layer.scale[:, None]).double()
    u = torch.from_numpy(np.stack([ind.feedback_factor(h, cfg.feedback_damp)
                                   for h in layer.input_moment.double().numpy()]))
    out, k = t.shape
    idx = layer.sort_index
    held = [[None] * k for _ in range(out)]
    stuck, levels = layer.stuck_cells(), layer.held_cells()
    for o in range(out):
        for kk in range(k):
            orig = int(idx[o, kk])
            if layer.stuck.numel():
                held[o][orig] = [int(lv) if bool(s) else None
                                 for s, lv in zip(stuck[o, kk], levels[o, kk])]
    per = out // u.shape[0]
    return torch.tensor([ind.feedback_row(t[o].tolist(), u[o // per].tolist(),
                                          held[o] if layer.stuck.numel() else None,
                                          cfg.weight_bits, cfg.bits_per_cell, cfg.encoding,
                                          cfg.stuck_slices)
                         for o in range(out)], dtype=torch.int32)


@pytest.mark.parametrize("kw", [dict(), dict(encoding="twos_complement", stuck_value=0),
                                dict(stuck_slices=0, reprogram_fraction=1.0, compensate=False),
                                dict(bits_per_cell=2, stuck_slices=1, weight_bits=6)])
def test_layers_compute_with_the_independent_choice(kw):
    torch.manual_seed(0)
    model = Tiny().eval()
    cfg = _config(**kw)
    xmodel = xb.convert(copy.deepcopy(model), cfg)
    for _, layer in xb.crossbar_layers(xmodel):
        assert layer.input_moment.numel() == 0  # not calibrated: convert programs rule 13
    x = torch.randn(5, 4, 6, 6)
    xb.calibrate(xmodel, x)
    layers = xb.crossbar_layers(xmodel)
    expected = {name: _expected(layer, cfg) for name, layer in layers}
    xb.reprogram(xmodel)
    for name, layer in layers:
        assert torch.equal(layer.effective_q(), expected[name]), name
    # the report counts this programming (cached) and a fresh count agrees
    report = xb.reprogram_report(xmodel).to_dict()
    again = xb.program_model(xmodel)
    assert report["writes_per_pass"] == again.per_pass.writes


def test_input_moment_is_what_the_crossbars_read():
    torch.manual_seed(1)
    model = Tiny().eval()
    xmodel = xb.convert(copy.deepcopy(model), _config())
    x = torch.randn(3, 4, 6, 6)
    xb.calibrate(xmodel, x)
    conv = xmodel.conv
    # the conv's im2col rows by hand: each output position reads a 3x3 window of its group
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1)).double()
    rows = []
    for n in range(3):
        for i in range(6):
            for j in range(6):
                rows.append(xp[n, :, i:i + 3, j:j + 3].reshape(2, 2 * 9))
    r = torch.stack(rows)  # (N, groups, K)
    want = torch.einsum("ngk,ngl->gkl", r, r) / r.shape[0]
    torch.testing.assert_close(conv.input_moment.double(), want, rtol=1e-5, atol=1e-6)
    assert xmodel.fc1.input_moment.shape == (1, 24, 24)


def test_feedback_lowers_the_output_error_against_rule_13():
    """The point of rule 21: on correlated inputs the layer's output error (against the float
    layer) falls well below rule 13's, on the calibration data and on fresh data alike."""
    torch.manual_seed(2)
    lin = nn.Linear(64, 32)
    base = torch.rand(400, 64) + 0.5  # mostly positive inputs, as after a GELU
    model = nn.Sequential(lin).eval()
    errors = {}
    for fb in ("none", "hessian"):
        cfg = xb.CrossbarConfig(rows=16, cols=28, sort="value", filter_order="chain",
                                stuck_slices=1, reprogram_fraction=0.0, compensate=True,
                                feedback=fb)
        xm = xb.convert(copy.deepcopy(model), cfg)
        xb.calibrate(xm, base[:200])
        xb.reprogram(xm)
        with torch.no_grad():
            test = base[200:]
            ref = model(test)
            errors[fb] = float((xm(test) - ref).norm() / ref.norm())
    assert errors["hessian"] < 0.5 * errors["none"], errors


def test_state_dict_keeps_the_moment_and_reprograms_alike():
    torch.manual_seed(3)
    model = Tiny().eval()
    cfg = _config()
    xmodel = xb.convert(copy.deepcopy(model), cfg)
    xb.calibrate(xmodel, torch.randn(4, 4, 6, 6))
    xb.reprogram(xmodel)
    sd = xmodel.state_dict()
    other = xb.convert(copy.deepcopy(model), cfg)
    other.load_state_dict(sd)
    assert torch.equal(other.fc1.input_moment, xmodel.fc1.input_moment)
    xb.reprogram(other)
    xb.reprogram(xmodel)
    for (_, a), (_, b) in zip(xb.crossbar_layers(xmodel), xb.crossbar_layers(other)):
        assert torch.equal(a.cells, b.cells)
    bad = dict(sd)
    bad["fc1.input_moment"] = torch.zeros(1, 5, 5)
    with pytest.raises(RuntimeError, match="input_moment"):
        xb.convert(copy.deepcopy(model), cfg).load_state_dict(bad)


def test_config_fields_are_validated():
    with pytest.raises(ValueError, match="feedback"):
        xb.CrossbarConfig(feedback="gptq")
    with pytest.raises(ValueError, match="compensate=true"):
        xb.CrossbarConfig(feedback="hessian", stuck_slices=1, reprogram_fraction=0.5)
    with pytest.raises(ValueError, match="feedback_damp"):
        xb.CrossbarConfig(feedback_damp=0)
    assert xb.CrossbarConfig(feedback="hessian").baseline().feedback == "none"


def test_calibrate_names_layers_that_lose_their_output():
    """warn_output_error: a stucking config whose layer loses more than the threshold of its
    output on the calibration data is said (without feedback the moments are then dropped)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(32, 16)).eval()
    x = torch.rand(64, 32) + 1.0
    cfg = xb.CrossbarConfig(rows=8, cols=28, stuck_slices=3, reprogram_fraction=0.0,
                            compensate=True, warn_output_error=1e-4)
    xm = xb.convert(copy.deepcopy(model), cfg)
    with pytest.warns(UserWarning, match=r"calibrate: 1 of 1 calibrated layer\(s\) have a "
                                         r"relative output error above warn_output_error=0.0001"
                                         r".*consider feedback='hessian' \(rule 21\)"):
        xb.calibrate(xm, x)
    assert xm[0].input_moment.numel() == 0
    # a layer already under rule 21 is not told to turn it on: a lighter policy is the advice
    fed = xb.convert(copy.deepcopy(model), cfg.replace(feedback="hessian", write_penalty=4.0))
    xb.calibrate(fed, x)
    with pytest.warns(UserWarning, match=r"consider lighter stucking or a lower write_penalty"):
        xb.reprogram(fed)
    quiet = xb.convert(copy.deepcopy(model), cfg.replace(warn_output_error=0.0))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xb.calibrate(quiet, x)


def test_a_preset_tuned_on_another_model_is_said():
    cfg = xb.CrossbarConfig(tuned_on="EfficientNet")
    with pytest.warns(UserWarning, match="tuned on EfficientNet, and the model is a Sequential"):
        xb.convert(nn.Sequential(nn.Linear(4, 4)), cfg)


def test_feedback_on_some_layers_only():
    """Rule 22 + 21: feedback set by a layer_overrides entry keeps that layer's moments and
    programs it with error feedback; the other layers stay rule 13."""
    torch.manual_seed(5)
    model = Tiny().eval()
    cfg = _config(feedback="none", layer_overrides={"fc2": {"feedback": "hessian"}})
    xmodel = xb.convert(copy.deepcopy(model), cfg)
    before = {n: l.effective_q().clone() for n, l in xb.crossbar_layers(xmodel)}
    xb.calibrate(xmodel, torch.randn(5, 4, 6, 6))
    lcfg = cfg.for_layer("fc2")
    want = _expected(xmodel.fc2, lcfg)
    xb.reprogram(xmodel)
    assert torch.equal(xmodel.fc2.effective_q(), want)
    assert not torch.equal(want, before["fc2"])
    assert torch.equal(xmodel.fc1.effective_q(), before["fc1"])  # rule 13, as before


def test_report_after_calibration_counts_the_feedback_programming():
    """A report asked between calibrate and reprogram must not reuse the counts of the
    programming before the moments existed: programming again would apply rule 21."""
    torch.manual_seed(6)
    model = Tiny().eval()
    xmodel = xb.convert(copy.deepcopy(model), _config())
    before = xb.reprogram_report(xmodel).to_dict()["writes_per_pass"]
    xb.calibrate(xmodel, torch.randn(5, 4, 6, 6))
    after = xb.reprogram_report(xmodel).to_dict()["writes_per_pass"]
    assert after == xb.program_model(xmodel).per_pass.writes
    assert after != before


# ---- rule 23: write-aware feedback -------------------------------------------------------------

def _chains(out, seed, p=0.7):
    """A random pred: chains over a shuffled order, some links left out."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(out, generator=g).tolist()
    pred = torch.full((out,), -1, dtype=torch.int64)
    links = torch.rand(out, generator=g) < p
    for i in range(1, out):
        if links[i]:
            pred[perm[i]] = perm[i - 1]
    return pred


@settings(max_examples=60, deadline=None)
@given(out=st.integers(0, 5), k=st.integers(0, 6), groups=st.sampled_from([1, 2]),
       bits=st.integers(3, 6), b=st.sampled_from([1, 2]), enc=st.integers(0, 2),
       L=st.integers(0, 3), seed=st.integers(0, 2 ** 16),
       penalty=st.sampled_from([0.25, 1.0, 2.5, 40.0]), held_p=st.sampled_from([0.0, 0.5]))
def test_write_aware_kernel_reference_independent_agree(out, k, groups, bits, b, enc, L, seed,
                                                         penalty, held_p):
    b, L, t, u, held, levels, pred, index = _write_aware_case(out, k, groups, bits, b, enc, L,
                                                              seed, held_p)
    got = ops.feedback_quantize(t, u, held, levels, bits, b, enc, L, pred, index, penalty)
    want = reference.feedback_quantize(t, u, held, levels, bits, b, enc, L, pred, index, penalty)
    assert torch.equal(got, want)
    if t.numel():
        sim = ind.write_aware_layer(t.tolist(), [x.tolist() for x in u], _held_rows(held, levels),
                                    bits, b, ENCODINGS[enc], L, pred.tolist(), index.tolist(),
                                    penalty)
        assert got.tolist() == sim


def _write_aware_case(out, k, groups, bits, b, enc, L, seed, held_p):
    """A drawn rule-23 case: the format made valid (``b``, ``L``), then ``_case``'s targets,
    factor and held cells, random chains and a random sort index per filter."""
    if b > (bits - 1 if enc == 0 else bits):
        b = 1
    S = slices_for(bits, b, enc)
    L = min(L, S - 1) if S > 1 else 0
    t, u, held, levels = _case(out, k, groups, bits, b, enc, L, seed, held_p)
    n = out * groups
    pred = _chains(n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    index = (torch.stack([torch.randperm(k, generator=g) for _ in range(n)]) if n
             else torch.zeros(0, k, dtype=torch.int64))
    return b, L, t, u, held, levels, pred, index


def _held_rows(held, levels):
    """The simulator's held cells: per filter, weight and cell, its level or None (free)."""
    return [[[int(lv) if h else None for h, lv in zip(hw, lw)]
             for hw, lw in zip(ho, lo)] for ho, lo in zip(held.tolist(), levels.tolist())]


@settings(max_examples=15, deadline=None)
@given(out=st.integers(9, 40), k=st.integers(1, 6), groups=st.sampled_from([1, 3]),
       link=st.sampled_from([0.0, 0.5, 1.0]), penalty=st.sampled_from([0.0, 1.5]),
       seed=st.integers(0, 2 ** 16))
def test_many_filters_in_blocks_and_chains_agree_with_the_reference(out, k, groups, link,
                                                                    penalty, seed):
    """The CPU kernel runs up to 32 filters (or 32 chains, in step) through U together: many
    filters per group, more than 32 chains (link 0: every filter its own chain), long chains
    (link 1) and chains whose filters change group on the way must give the reference's
    integers, filter by filter."""
    bits, b, enc, L = 5, 1, 0, 1
    t, u, held, levels = _case(out, k, groups, bits, b, enc, L, seed, 0.4)
    n = out * groups
    if penalty:
        pred = _chains(n, seed, link)
        g = torch.Generator().manual_seed(seed + 1)
        index = torch.stack([torch.randperm(k, generator=g) for _ in range(n)])
        got = ops.feedback_quantize(t, u, held, levels, bits, b, enc, L, pred, index, penalty)
        want = reference.feedback_quantize(t, u, held, levels, bits, b, enc, L, pred, index,
                                           penalty)
    else:
        got = ops.feedback_quantize(t, u, held, levels, bits, b, enc, L)
        want = reference.feedback_quantize(t, u, held, levels, bits, b, enc, L)
    assert torch.equal(got, want)


def test_write_aware_hand_case():
    """1-bit differential, 4 bits (S = 3), nothing held, H = I: the predecessor chose 3 =
    (pos 1,1,0; neg 0,0,0). Target 2.4: rule 21 takes 2 (pos 0,1,0: one cell differs); with a
    penalty of 1 LSB^2 per write, 3 costs 0.36 + 0 against 2's 0.16 + 1, so 3 wins; a penalty
    of 0.1 keeps 2 (0.26 < 0.36)."""
    t = torch.tensor([[3.0], [2.4]], dtype=torch.float64)
    u = torch.eye(1, dtype=torch.float64)[None]
    none_b, none_u = torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.uint8)
    pred = torch.tensor([-1, 0])
    index = torch.zeros(2, 1, dtype=torch.int64)
    assert ops.feedback_quantize(t, u, none_b, none_u, 4, 1, 0, 0, pred, index,
                                 1.0).flatten().tolist() == [3, 3]
    assert ops.feedback_quantize(t, u, none_b, none_u, 4, 1, 0, 0, pred, index,
                                 0.1).flatten().tolist() == [3, 2]
    assert ops.feedback_quantize(t, u, none_b, none_u, 4, 1, 0, 0).flatten().tolist() == [3, 2]


def test_write_aware_bad_arguments_are_refused():
    t = torch.zeros(3, 2, dtype=torch.float64)
    u = torch.eye(2, dtype=torch.float64)[None]
    none_b, none_u = torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.uint8)
    index = torch.tensor([[0, 1]] * 3)
    for pred, msg in ((torch.tensor([1, 2, 0]), "cycle"), (torch.tensor([-1, 0, 0]), "both"),
                      (torch.tensor([-1, 5, 0]), r"pred\[1\]"), (torch.tensor([0, -1, -1]),
                                                                 r"pred\[0\]")):
        with pytest.raises(RuntimeError, match=msg):
            ops.feedback_quantize(t, u, none_b, none_u, 8, 1, 0, 0, pred, index, 1.0)
    with pytest.raises(RuntimeError, match="not a permutation"):
        ops.feedback_quantize(t, u, none_b, none_u, 8, 1, 0, 0, torch.tensor([-1, 0, 1]),
                              torch.tensor([[0, 0]] * 3), 1.0)
    with pytest.raises(RuntimeError, match="write_penalty"):
        ops.feedback_quantize(t, u, none_b, none_u, 8, 1, 0, 0, None, None, -1.0)
    with pytest.raises(RuntimeError, match="pred"):
        ops.feedback_quantize(t, u, none_b, none_u, 8, 1, 0, 0, torch.tensor([-1, 0]), index,
                              1.0)
    with pytest.raises(RuntimeError, match="sort_index"):
        ops.feedback_quantize(t, u, none_b, none_u, 8, 1, 0, 0, torch.tensor([-1, 0, 1]),
                              index.int(), 1.0)


def _predecessors(layer, cfg):
    """Rule 23 by hand: the filter in the same slot `pool` blocks earlier."""
    F = cfg.cols // cfg.cells_per_weight
    fi = layer.filter_index.tolist()
    out = layer.cells.shape[0]
    pred = [-1] * out
    for pos, o in enumerate(fi):
        j, f = divmod(pos, F)
        if o >= 0 and j >= cfg.pool and fi[(j - cfg.pool) * F + f] >= 0:
            pred[o] = fi[(j - cfg.pool) * F + f]
    return pred


def _expected_write_aware(layer, cfg):
    w = layer.matrix_weight().detach().float()
    t = (w / layer.scale[:, None]).double()
    u = [ind.feedback_factor(h, cfg.feedback_damp).tolist()
         for h in layer.input_moment.double().numpy()]
    out, k = t.shape
    idx = layer.sort_index.long()
    held = None
    if layer.stuck.numel():
        stuck, levels = layer.stuck_cells(), layer.held_cells()
        held = [[None] * k for _ in range(out)]
        for o in range(out):
            for kk in range(k):
                held[o][int(idx[o, kk])] = [int(lv) if bool(s) else None
                                            for s, lv in zip(stuck[o, kk], levels[o, kk])]
    return torch.tensor(ind.write_aware_layer(t.tolist(), u, held, cfg.weight_bits,
                                              cfg.bits_per_cell, cfg.encoding, cfg.stuck_slices,
                                              _predecessors(layer, cfg), idx.tolist(),
                                              cfg.write_penalty), dtype=torch.int32)


@pytest.mark.parametrize("kw", [dict(), dict(pool=2, reprogram_fraction=0.0),
                                dict(stuck_slices=0, reprogram_fraction=1.0, compensate=False)])
def test_write_aware_layers_compute_with_the_independent_choice(kw):
    torch.manual_seed(7)
    model = Tiny().eval()
    cfg = _config(write_penalty=1.5, **kw)
    xmodel = xb.convert(copy.deepcopy(model), cfg)
    xb.calibrate(xmodel, torch.randn(5, 4, 6, 6))
    layers = xb.crossbar_layers(xmodel)
    expected = {name: _expected_write_aware(layer, cfg) for name, layer in layers}
    xb.reprogram(xmodel)
    for name, layer in layers:
        assert torch.equal(layer.effective_q(), expected[name]), name
    report = xb.reprogram_report(xmodel).to_dict()
    assert report["writes_per_pass"] == xb.program_model(xmodel).per_pass.writes


def test_write_penalty_saves_writes():
    """The point of rule 23: on a layer mapped by value sort and chain placement, a penalty
    lowers the writes per pass against rule 21 alone, and a larger one lowers them further,
    while the output error stays within a few times rule 21's."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(96, 64)).eval()
    x = torch.rand(300, 96) + 0.2
    writes, errors = {}, {}
    for pen in (0.0, 1.0, 4.0):
        cfg = xb.CrossbarConfig(rows=32, cols=28, sort="value", filter_order="chain",
                                stuck_slices=1, reprogram_fraction=0.0, compensate=True,
                                feedback="hessian", write_penalty=pen)
        xm = xb.convert(copy.deepcopy(model), cfg)
        xb.calibrate(xm, x[:200])
        xb.reprogram(xm)
        writes[pen] = xb.reprogram_report(xm).to_dict()["writes_per_pass"]
        with torch.no_grad():
            ref = model(x[200:])
            errors[pen] = float((xm(x[200:]) - ref).norm() / ref.norm())
    assert writes[4.0] < writes[1.0] < writes[0.0], writes
    assert errors[1.0] < 3 * errors[0.0], errors


def test_write_penalty_config():
    with pytest.raises(ValueError, match="write_penalty"):
        xb.CrossbarConfig(write_penalty=1.0)  # needs feedback
    with pytest.raises(ValueError, match="write_penalty"):
        xb.CrossbarConfig(feedback="hessian", write_penalty=-1)
    with pytest.raises(ValueError, match="write_penalty"):
        xb.CrossbarConfig(feedback="hessian", write_penalty=float("inf"))
    cfg = xb.CrossbarConfig(feedback="hessian", write_penalty="0.5")
    assert cfg.write_penalty == 0.5 and cfg.baseline().write_penalty == 0.0
    over = xb.CrossbarConfig(feedback="hessian",
                             layer_overrides={"fc*": {"write_penalty": 2.0}})
    assert over.for_layer("fc1").write_penalty == 2.0 and over.for_layer("x").write_penalty == 0


@pytest.mark.parametrize("kw", [dict(), dict(stuck_slices=0, reprogram_fraction=1.0,
                                             compensate=False, write_penalty=2.0)])
def test_training_forward_of_a_calibrated_layer_is_the_deployed_one(kw):
    """Rule 21's programming is a sequential solve, not the rule-13 compensation a training
    forward simulates for other layers: a calibrated layer trains with the cells it holds, so
    what fine-tuning optimizes is the model that is deployed (it used to be the plain rounding,
    and MiniLM's distillation made the deployed model worse). The gradient still reaches the
    latent weight (straight through); an uncalibrated layer still simulates rule 13."""
    torch.manual_seed(11)
    model = Tiny().eval()
    x = torch.randn(5, 4, 6, 6)
    xmodel = xb.convert(copy.deepcopy(model), _config(**kw))
    plain = {n: l.simulated_weight() for n, l in xb.crossbar_layers(xmodel)}
    xb.calibrate(xmodel, x)
    xb.reprogram(xmodel)
    with torch.no_grad():
        y_eval = xmodel.eval()(x)
    y_train = xmodel.train()(x)
    assert torch.equal(y_train, y_eval)
    y_train.square().sum().backward()
    moved = False
    for name, layer in xb.crossbar_layers(xmodel):
        assert layer.weight.grad is not None and bool(layer.weight.grad.abs().sum() > 0), name
        assert torch.equal(layer.simulated_weight(), layer.effective_weight()), name
        moved |= not torch.equal(layer.simulated_weight(), plain[name])
    assert moved  # the feedback chose other levels than rule 13 would (else the test is empty)


def test_a_wrapped_model_is_programmed_with_its_layers_policies():
    """Rule 22's patterns match the names convert gave the layers, also when the converted
    model is wrapped afterwards (sentence distillation wraps it in a SentenceEmbedder): the
    fine-tuning's final reprogramming once matched them against "model.<name>", dropped every
    override, and mpnet's cosine fell from 0.991 to 0.963 with nothing trained."""
    torch.manual_seed(12)
    model = Tiny().eval()
    cfg = _config(stuck_slices=0, reprogram_fraction=1.0, compensate=False, write_penalty=0.0,
                  layer_overrides={"fc*": {"write_penalty": 8.0}})
    xmodel = xb.convert(copy.deepcopy(model), cfg)
    xb.calibrate(xmodel, torch.randn(5, 4, 6, 6))
    xb.reprogram(xmodel)
    held = {n: l.cells.clone() for n, l in xb.crossbar_layers(xmodel)}
    writes = xb.reprogram_report(xmodel).to_dict()["writes_per_pass"]
    wrapped = nn.ModuleDict({"model": xmodel})
    assert xb.reprogram(wrapped).per_pass.writes == writes
    for name, layer in xb.crossbar_layers(xmodel):
        assert torch.equal(layer.cells, held[name]), name
    # and the policy did matter (else the test is empty): without the overrides other cells
    plain = xb.convert(copy.deepcopy(model), cfg.replace(layer_overrides={}))
    xb.calibrate(plain, torch.randn(5, 4, 6, 6))
    assert xb.reprogram(plain).per_pass.writes != writes


@pytest.mark.parametrize("penalty, held_p", [(0.0, 0.0), (0.0, 0.4), (1.5, 0.0), (1.5, 0.4)])
def test_long_filters_agree_with_the_reference(penalty, held_p):
    """Filters longer than the CPU kernel's pieces of U's rows and its vector width, 9 filters:
    the vectorised carry and the distance-ordered write-aware search (weights without held
    cells) give the reference's integers, on 1, 2 and 3 threads (with rule 23 the 9 filters
    form 3 chains, which the threads share out)."""
    bits, b, enc, L, k = 4, 1, 0, 1, 1030
    t, u, held, levels = _case(9, k, 1, bits, b, enc, L, seed=5, held_p=held_p)
    args = (t, u, held, levels, bits, b, enc, L)
    if penalty:
        pred = torch.tensor([-1, 0, 1, -1, 3, -1, 5, 6, 7])
        index = torch.stack([torch.randperm(k, generator=torch.Generator().manual_seed(o))
                             for o in range(9)])
        args = args + (pred, index, penalty)
    want = reference.feedback_quantize(*args)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert torch.equal(ops.feedback_quantize(*args), want), f"{threads} thread(s)"
    finally:
        torch.set_num_threads(before)


class _SharedInput(nn.Module):
    """q, k and v read one tensor; it changes in place before v2 reads it; o reads another."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(6, 4), nn.Linear(6, 5)
        self.v2, self.o = nn.Linear(6, 4), nn.Linear(4, 3)

    def forward(self, x):
        x = x.clone()
        y = self.q(x) + self.k(x)[..., :4]
        x.mul_(2.0)  # in place: v2 reads other values through the same tensor object
        return self.o(y + self.v2(x))


@pytest.mark.parametrize("inference", [False, True])
def test_layers_reading_one_tensor_get_their_own_moments(inference):
    """Layers that read the same tensor share the product of its rows (computed once); a
    change in place in between, and a second forward call, are still seen, also under
    inference mode (sentence-transformers' encode), whose tensors keep no version counter."""
    torch.manual_seed(0)
    xmodel = xb.convert(_SharedInput().eval(), _config(rows=8, cols=16))
    xs = [torch.randn(2, 3, 6), torch.randn(5, 6)]

    def run(m):
        with torch.inference_mode(inference):
            return [m(x) for x in xs]
    xb.calibrate(xmodel, run=run)
    rows = torch.cat([x.reshape(-1, 6) for x in xs]).double()
    want = rows.T @ rows / rows.shape[0]
    for name, scale in (("q", 1.0), ("k", 1.0), ("v2", 4.0)):
        got = getattr(xmodel, name).input_moment[0].double()
        torch.testing.assert_close(got, want * scale, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        ys = [xmodel.q(r) + xmodel.k(r)[:, :4] + xmodel.v2(2.0 * r)
              for r in (x.reshape(-1, 6) for x in xs)]
    y = torch.cat(ys).double()
    torch.testing.assert_close(xmodel.o.input_moment[0].double(), y.T @ y / y.shape[0],
                               rtol=1e-5, atol=1e-6)


def test_layers_reading_one_tensor_share_its_products_on_every_call(monkeypatch):
    """The rows' products are computed once per tensor the layers read, on the first call and
    on later ones (where a copy to compare is taken only for the layers whose input the next
    layer read): q and k share, v2 (after the in-place change) and o do not; the moments are
    the same as with every product computed."""
    from crossbar_torch import moments
    torch.manual_seed(1)
    xmodel = xb.convert(_SharedInput().eval(), _config(rows=8, cols=16))
    xs = [torch.randn(4, 6) for _ in range(3)]
    calls, products = [], moments.MomentAccumulator.products

    def counted(self, rows, threads=None):
        calls.append(rows.shape)
        return products(self, rows, threads)
    monkeypatch.setattr(moments.MomentAccumulator, "products", counted)
    xb.calibrate(xmodel, run=lambda m: [m(x) for x in xs])
    assert len(calls) == 3 * len(xs)  # q (k shares), v2, o: on every call
    got = [getattr(xmodel, n).input_moment.clone() for n in ("q", "k", "v2", "o")]
    monkeypatch.setattr(xmodel.k, "shares_input_rows", False)  # k computes its own
    xb.calibrate(xmodel, run=lambda m: [m(x) for x in xs])
    for g, n in zip(got, ("q", "k", "v2", "o")):
        assert torch.equal(g, getattr(xmodel, n).input_moment), n


class _Wide(nn.Module):
    """A Linear layer with more inputs than one column block of the moment's product, and a
    grouped convolution with more than one block per group."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(203, 5)
        self.conv = nn.Conv2d(16, 4, 3, padding=1, groups=2)  # K = 8 * 9 = 72 per group

    def forward(self, x, img):
        return self.fc(x).sum() + self.conv(img).sum()


def test_moment_in_column_blocks_over_many_chunks():
    """The upper triangle, block by block over chunks of 4096 rows, then mirrored: E[x x^T]
    of every row read (float64 by hand; float32 products, float64 sums), exactly symmetric."""
    torch.manual_seed(3)
    xmodel = xb.convert(_Wide().eval(), _config(rows=16, cols=16))
    x = torch.randn(9000, 203) + torch.linspace(-1, 1, 203)  # three chunks, the last partial
    img = torch.randn(2, 16, 5, 5)
    xb.calibrate(xmodel, (x, img))
    xd = x.double()
    torch.testing.assert_close(xmodel.fc.input_moment[0].double(), xd.T @ xd / xd.shape[0],
                               rtol=1e-5, atol=1e-5)
    cols = torch.nn.functional.unfold(img.double(), 3, padding=1)  # (N, 16 * 9, L)
    r = cols.transpose(1, 2).reshape(-1, 2, 72)  # (rows, groups, K), (channel, kh, kw) order
    want = torch.einsum("ngk,ngl->gkl", r, r) / r.shape[0]
    torch.testing.assert_close(xmodel.conv.input_moment.double(), want, rtol=1e-5, atol=1e-5)
    for h in (xmodel.fc.input_moment, xmodel.conv.input_moment):
        assert torch.equal(h, h.transpose(1, 2))


def test_output_energies_over_column_blocks_are_those_of_the_inputs():
    """tr(E H E^T) and tr(W H W^T) from the upper blocks of H (quadratic_forms) are the mean
    squared output error and output of the rows the layer read (float64 by hand), for a Linear
    layer of four column blocks and a grouped convolution of two blocks per group."""
    torch.manual_seed(4)
    model = _Wide().eval()
    xmodel = xb.convert(model, _config(rows=16, cols=16))
    x = torch.randn(300, 203) + torch.linspace(-1, 1, 203)
    img = torch.randn(2, 16, 5, 5)
    xb.calibrate(xmodel, (x, img))
    xb.reprogram(xmodel)
    with torch.no_grad():
        w = model.fc.weight.double()
        e = xmodel.fc.effective_weight().double() - w
        want = (float(((x.double() @ e.T) ** 2).sum(1).mean()),
                float(((x.double() @ w.T) ** 2).sum(1).mean()))
        assert want[0] > 0
        assert feedback.layer_output_energies(xmodel.fc) == pytest.approx(want, rel=1e-5)
        cols = torch.nn.functional.unfold(img.double(), 3, padding=1)
        r = cols.transpose(1, 2).reshape(-1, 2, 72)  # (rows, groups, K)
        wc = model.conv.weight.double().reshape(2, 2, 72)  # (groups, out per group, K)
        ec = xmodel.conv.effective_weight().double().reshape(2, 2, 72) - wc
        want = tuple(float(torch.einsum("ngk,gok->ngo", r, m).pow(2).sum((1, 2)).mean())
                     for m in (ec, wc))
        assert feedback.layer_output_energies(xmodel.conv) == pytest.approx(want, rel=1e-5)


def test_factor_cache_gives_the_last_factor_only_for_an_equal_moment_and_damping():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 1, 9, generator=g)
    h = torch.einsum("ngk,ngl->gkl", x, x) / 40
    cache = feedback.FactorCache()
    u = cache.factor(h, 0.01)
    assert torch.equal(u, feedback_factor(h, 0.01))
    assert cache.factor(h.clone(), 0.01) is u  # an equal moment (query, key and value)
    other = h.clone()
    other[0, 3, 3] += 1e-3
    for m, damp in ((h, 0.1), (other, 0.01), (h[:, :8, :8].contiguous(), 0.01)):
        got = cache.factor(m, damp)
        assert got is not u and torch.equal(got, feedback_factor(m, damp))
        u = got


def test_factors_side_by_side_are_the_factors_one_at_a_time():
    """``feedback_factors`` (each factor on one thread from end to end, two at once) gives
    ``feedback_factor``'s bits (each product's halves side by side): the same products. Sizes
    past the 256-row leaf, so the halving runs; groups; an empty moment."""
    g = torch.Generator().manual_seed(11)
    moments = []
    for groups, k in ((1, 300), (2, 520), (1, 7), (1, 0)):
        x = torch.randn(2 * k + 3, groups, k, generator=g).relu()
        moments.append(torch.einsum("ngk,ngl->gkl", x, x) / (2 * k + 3))
    for got, m in zip(feedback.feedback_factors(moments, 0.01), moments):
        assert torch.equal(got, feedback_factor(m, 0.01))


def test_factor_cache_computes_the_next_factor_of_a_shape_beside_and_gives_it_later():
    """With a plan (the layers' moments in programming order), a factor is computed beside the
    next planned one of its shape that has another factor; every factor given is
    ``feedback_factor``'s, equal moments share one, and a moment off the plan still gets its
    own."""
    g = torch.Generator().manual_seed(6)

    def moment(k):
        x = torch.randn(3 * k, 1, k, generator=g)
        return torch.einsum("ngk,ngl->gkl", x, x) / (3 * k)

    a, b, c, d, e = moment(9), moment(9), moment(13), moment(9), moment(13)
    a2 = a.clone()  # the key's moment after the query's
    plan = [(a, 0.01), (a2, 0.01), (b, 0.01), (c, 0.01), (d, 0.01), (e, 0.01), (b, 0.1)]
    cache = feedback.FactorCache(plan)
    ua = cache.factor(a, 0.01)
    assert torch.equal(ua, feedback_factor(a, 0.01))
    assert set(cache.ahead) == {id(b)}  # a's partner: b (a2 is equal to a)
    assert cache.factor(a2, 0.01) is ua
    for m, damp in plan[2:]:
        assert torch.equal(cache.factor(m, damp), feedback_factor(m, damp))
    assert not cache.ahead  # c went with e, d alone, b at 0.1 alone: none left over
    off = moment(9)
    assert torch.equal(cache.factor(off, 0.01), feedback_factor(off, 0.01))


@pytest.mark.parametrize("k", [1, 63, 64, 65, 203, 700])
def test_quadratic_forms_from_the_upper_blocks(k):
    """r^T H r of every row, the part right of each block's square counted twice, against the
    whole product in float64."""
    g = torch.Generator().manual_seed(k)
    x = torch.randn(3 * k + 5, k, generator=g) + 0.5
    h = x.T @ x / x.shape[0]
    h = torch.triu(h) + torch.triu(h, 1).T  # exactly symmetric, as rule 21 stores it
    rows = torch.randn(7, k, generator=g)
    want = ((rows.double() @ h.double()) * rows.double()).sum(1)
    torch.testing.assert_close(feedback.quadratic_forms(rows, h), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("k", [1, 255, 256, 257, 700])
def test_factor_is_the_independent_factor(k):
    """U and D from one Cholesky factor of the reversed matrix: upper triangular with exact
    zeros below the diagonal, and the independent simulator's factor (numpy: invert, factorise
    the inverse, invert its factor) to float64's rounding."""
    g = torch.Generator().manual_seed(k)
    x = torch.randn(2 * k + 3, 2, k, generator=g, dtype=torch.float64)
    x[:, :, 0] += 2.0
    h = (torch.einsum("ngk,ngl->gkl", x, x) / x.shape[0]).float()
    u = feedback_factor(h, 0.01)
    assert u.dtype == torch.float64 and u.shape == (2, k, k)
    assert torch.equal(u, u.triu())
    for gi in range(2):
        want = torch.from_numpy(ind.feedback_factor(h[gi].double().numpy(), 0.01))
        torch.testing.assert_close(u[gi], want, rtol=1e-9, atol=1e-10)


def _factor_by_torch_ops(moment, damp):
    """Rule 21's factor as torch's own ops give it: the damped moment in float64, its reversal,
    linalg.cholesky's upper factor, reversed back, each column over its diagonal."""
    h = moment.to(torch.float64, copy=True)
    d = h.diagonal(dim1=1, dim2=2)
    d[d == 0] = 1.0
    d += damp * d.mean(dim=1, keepdim=True)
    if h.shape[-1] == 0:
        return h
    f = torch.linalg.cholesky(h.flip(-1, -2), upper=True).mT.flip(-1, -2)
    dd = f.diagonal(dim1=1, dim2=2).clone()
    f.div_(dd[:, None, :])
    f.diagonal(dim1=1, dim2=2).copy_(dd * dd)
    return f


@settings(max_examples=25, deadline=None)
@given(groups=st.integers(1, 3), k=st.sampled_from([0, 1, 2, 5, 64, 129, 300]),
       damp=st.sampled_from([0.0, 0.01, 0.3]), unseen=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_factor_op_is_the_factor_torchs_cholesky_gives(groups, k, damp, unseen, seed):
    """The ``feedback_factor`` op (the reversed damped moment written straight into LAPACK's
    buffer, U read back from it) gives, bit for bit, what torch's flip / cholesky / flip /
    divide give, on one thread: groups, inputs never seen (a zero row and column, made 1),
    no damping, K of 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * k + 5, groups, k, generator=g).relu()
    m = torch.einsum("ngk,ngl->gkl", x, x) / x.shape[0]
    if unseen and k > 1:
        m[:, 1, :] = 0
        m[:, :, 1] = 0
    with one_thread():
        assert torch.equal(ops.feedback_factor(m, damp), _factor_by_torch_ops(m, damp))


def test_factor_op_refuses_what_it_cannot_factor():
    m = torch.ones(1, 3, 3)  # rank one: not positive-definite without damping
    with pytest.raises(RuntimeError, match="not positive-definite"):
        ops.feedback_factor(m, 0.0)
    assert ops.feedback_factor(m, 0.01).shape == (1, 3, 3)
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        ops.feedback_factor(torch.full((1, 2, 2), float("nan")), 0.01)
    with pytest.raises(RuntimeError, match="damp"):
        ops.feedback_factor(torch.eye(2)[None], -1.0)
    with pytest.raises(RuntimeError, match="Float"):
        ops.feedback_factor(torch.eye(2, dtype=torch.float64)[None], 0.01)
    with pytest.raises(RuntimeError, match="K = moment.size"):
        ops.feedback_factor(torch.zeros(1, 2, 3), 0.01)
    meta = ops.feedback_factor(torch.empty(2, 4, 4, device="meta"), 0.01)
    assert meta.shape == (2, 4, 4) and meta.dtype == torch.float64 and meta.is_meta


class _Overflow(nn.Module):
    """A layer of 100 inputs fed a value whose square overflows float32, in an input past the
    moment's first column block, from inside the model (the batch itself is finite)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(100, 4)

    def forward(self, x):
        return self.fc(x * torch.cat([torch.ones(90), torch.full((10,), 1e30)]))


def test_an_overflowing_layer_input_fails_calibration_and_keeps_the_moment():
    torch.manual_seed(0)
    xmodel = xb.convert(_Overflow().eval(), _config(rows=16, cols=16))
    with pytest.raises(xb.errors.InvalidTensorError, match="NaN or Inf"):
        xb.calibrate(xmodel, torch.randn(5, 100))
    assert xmodel.fc.input_moment.numel() == 0


@settings(max_examples=40, deadline=None)
@given(out=st.integers(0, 5), k=st.integers(0, 9), groups=st.sampled_from([1, 2]),
       L=st.integers(0, 2), penalty=st.sampled_from([0.0, 1.5]), seed=st.integers(0, 2 ** 16))
def test_running_targets_are_the_references(out, k, groups, L, penalty, seed):
    """The op's running targets (each weight's when it was chosen; what the warning's output
    error is computed from) equal the reference's bit for bit, with and without rule 23."""
    bits, b, enc = 6, 1, 0
    t, u, held, levels = _case(out, k, groups, bits, b, enc, L, seed)
    kw, n = {}, t.shape[0]
    if penalty:  # one chain through every filter; random sort positions
        gen = torch.Generator().manual_seed(seed)
        kw = dict(pred=torch.arange(-1, n - 1, dtype=torch.int64),
                  sort_index=torch.stack([torch.randperm(k, generator=gen) for _ in range(n)])
                  if n else torch.zeros(0, k, dtype=torch.int64),
                  write_penalty=penalty)
    q, run = ops.feedback_quantize(t, u, held, levels, bits, b, enc, L, running=True, **kw)
    if penalty:  # the reference names the sort index `index`
        kw["index"] = kw.pop("sort_index")
    want_q, want_run = reference.feedback_quantize(t, u, held, levels, bits, b, enc, L,
                                                   running=True, **kw)
    assert torch.equal(q, want_q) and torch.equal(run, want_run)
    if out and k:  # the first weight of each filter sees no carry
        assert torch.equal(run[:, 0], t[:, 0])


def _packed_sorted(held, levels, index, b):
    """A layer's own buffers for ``held`` / ``levels`` ((out, K, c), original order): sorted
    (position p of filter o holds weight index[o, p]), then packed by hand (8 flags a byte)."""
    rows = index[:, :, None].expand(-1, -1, held.shape[2])
    return (ind.pack_by_hand(torch.gather(held, 1, rows).to(torch.uint8), 1),
            ind.pack_by_hand(torch.gather(levels, 1, rows), b))


@settings(max_examples=60, deadline=None)
@given(out=st.integers(0, 40), k=st.integers(0, 9), groups=st.sampled_from([1, 2]),
       bits=st.integers(3, 8), b=st.sampled_from([1, 2, 3, 4]), enc=st.integers(0, 2),
       L=st.integers(0, 3), held_p=st.sampled_from([0.4, 1.0]),
       penalty=st.sampled_from([0.0, 1.5]), seed=st.integers(0, 2 ** 16))
def test_packed_sorted_held_cells_are_the_unpacked_ones(out, k, groups, bits, b, enc, L,
                                                        held_p, penalty, seed):
    """The op reads a layer's own buffers (``stuck`` / ``cells``: uint8, packed, sorted order,
    through the sort index; what reprogramming passes) exactly as the unpacked original-order
    cells: the same integers and running targets, with and without rule 23, over 32-filter
    sets, slot widths 1, 2 and 4 (b = 3 keeps a nibble a cell) and every low cell held."""
    if b > (bits - 1 if enc == 0 else bits):
        b = 1
    S = slices_for(bits, b, enc)
    L = min(L, S - 1) if S > 1 else 0
    t, u, held, levels = _case(out, k, groups, bits, b, enc, L, seed, held_p)
    n = t.shape[0]
    gen = torch.Generator().manual_seed(seed + 2)
    index = (torch.stack([torch.randperm(k, generator=gen) for _ in range(n)]) if n
             else torch.zeros(0, k, dtype=torch.int64))
    pred = _chains(n, seed) if penalty else None
    flags, packed = _packed_sorted(held, levels, index, b)
    got = ops.feedback_quantize(t, u, flags, packed, bits, b, enc, L, pred, index, penalty,
                                running=True)
    want = ops.feedback_quantize(t, u, held, levels, bits, b, enc, L, pred, index, penalty,
                                 running=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    ref = reference.feedback_quantize(t, u, held, levels, bits, b, enc, L, pred, index, penalty)
    assert torch.equal(got[0], ref)


def test_packed_held_cells_need_their_sort_index_and_valid_levels():
    """Packed held cells are read through the sort index: without one, or with packed levels
    whose slot holds a level the cell cannot (b = 3: a nibble of 8 or more), the op says so."""
    t = torch.zeros(2, 3, dtype=torch.float64)
    u = torch.eye(3, dtype=torch.float64)[None]
    c = cells_for(6, 3, 0)
    flags = torch.zeros(2, 3, 1, dtype=torch.uint8)
    levels = torch.zeros(2, 3, -(-c // 2), dtype=torch.uint8)
    index = torch.tensor([[0, 1, 2], [2, 1, 0]])
    with pytest.raises(RuntimeError, match="sort_index"):
        ops.feedback_quantize(t, u, flags, levels, 6, 3, 0, 1)
    assert ops.feedback_quantize(t, u, flags, levels, 6, 3, 0, 1, sort_index=index).shape == (2, 3)
    with pytest.raises(RuntimeError, match="index row 1 is not a permutation"):
        ops.feedback_quantize(t, u, flags, levels, 6, 3, 0, 1,
                              sort_index=torch.tensor([[0, 1, 2], [2, 2, 0]]))
    levels[1, 2, 0] = 0x80  # the second slot of the first byte: level 8
    with pytest.raises(RuntimeError, match="level 8"):
        ops.feedback_quantize(t, u, flags, levels, 6, 3, 0, 1, sort_index=index)
    with pytest.raises(RuntimeError, match=r"held.*ceil\(c / 8\) bytes"):
        ops.feedback_quantize(t, u, torch.zeros(2, 3, 2, dtype=torch.uint8), levels, 6, 3, 0, 1,
                              sort_index=index)


_UNSTUCK = dict(stuck_slices=0, reprogram_fraction=1.0, compensate=False)


@pytest.mark.parametrize("kw", [dict(), dict(write_penalty=2.0, **_UNSTUCK),
                                dict(feedback_sweeps=1, **_UNSTUCK),
                                dict(feedback_sweeps=2, write_penalty=2.0, **_UNSTUCK)])
def test_the_warnings_energy_from_the_residuals_is_the_products(kw):
    """After a rule-21 reprogramming, the output error energy the warning reads (from the
    kernel's running targets: tr(E Hd E^T) = sum D (q - t)^2, less the damping; after rule 24's
    sweeps, which move q after that kernel, from the sweeps' own running products: m d^T Hs d,
    less the damping) is the one the products with H give, both to 1e-5 of a float64
    computation by hand (the products are float32; the residuals stand s t0 for W); it is
    dropped once the latent weight changes."""
    torch.manual_seed(4)
    xmodel = xb.convert(_Wide().eval(), _config(rows=16, cols=16, **kw))
    x = torch.randn(300, 203) + torch.linspace(-1, 1, 203)
    img = torch.randn(2, 16, 5, 5)
    xb.calibrate(xmodel, (x, img))
    xb.reprogram(xmodel)
    for layer in (xmodel.fc, xmodel.conv):
        assert layer.noted_output_error() is not None
        noted = feedback.layer_output_energies(layer, noted=True)
        products = feedback.layer_output_energies(layer)
        h = layer.input_moment.double()
        w = layer.matrix_weight().detach().double().reshape(h.shape[0], -1, h.shape[1])
        e = layer.effective_weight().detach().double().reshape(w.shape) - w
        want = tuple(float(torch.einsum("gok,gkl,gol->", m, h, m)) for m in (e, w))
        assert want[0] > 0
        assert noted == pytest.approx(want, rel=1e-5)
        assert products == pytest.approx(want, rel=1e-5)
    with torch.no_grad():
        xmodel.fc.weight.mul_(1.01)
    assert xmodel.fc.noted_output_error() is None
