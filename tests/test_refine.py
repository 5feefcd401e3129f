"""Rule 24 (docs/semantics.md): refinement sweeps after rules 21 and 23, held to
tests/independent.py.

* the ``feedback_refine`` kernel == the plain-PyTorch reference == the naive simulator, exactly,
  on hypothesis-drawn formats, shapes (empty and odd), groups, chains, penalties and sweeps;
* the sweeps never raise the objective ``J`` they descend, and lower it where they move;
* the layers: after ``calibrate`` + ``reprogram`` each layer computes with exactly the integers
  the simulator's rule 23 then rule 24 choose; the config refuses what the rule does not cover.
"""
import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import crossbar_torch as xb
from crossbar_torch import ops
from crossbar_torch.feedback import scaled_moment
from crossbar_torch.ops import feedback_reference as reference

import independent as ind
# the rule-21 / 23 tests' model, random chains and rule 23's predecessors by hand
from test_feedback import Tiny, _chains, _predecessors

ENCODINGS = ("differential", "twos_complement", "offset")


def _case(out, k, groups, bits, seed):
    """Targets, a scaled moment per group (correlated inputs), rule-2 integers a few LSB off
    (so that sweeps have moves to make), a chain structure and sort index."""
    g = torch.Generator().manual_seed(seed)
    n = out * groups
    qmax = 2 ** (bits - 1) - 1
    t = torch.randn(n, k, generator=g, dtype=torch.float64) * qmax / 3
    q = (t.round() + torch.randint(-2, 3, (n, k), generator=g)).clamp(-qmax, qmax).int()
    x = torch.randn(groups, 3 * k + 2, k, generator=g, dtype=torch.float64)
    if k:
        x[:, :, 0] += 1.0
    moment = (x.transpose(1, 2) @ x / x.shape[1]).float()
    hs = scaled_moment(moment, 0.05)
    pred = _chains(n, seed)
    index = (torch.stack([torch.randperm(k, generator=g) for _ in range(n)]) if n
             else torch.zeros(0, k, dtype=torch.int64))
    return t, hs, q, pred, index


def _objective(t, hs, q, pred, index, bits, b, enc, penalty):
    """J of rule 24, computed directly: sum_o d_o^T Hs d_o + penalty * (cells differing from
    the predecessor's at the same sorted position), in float64."""
    n = q.shape[0]
    if not n or not q.shape[1]:
        return 0.0
    per = n // hs.shape[0]
    d = q.double() - t
    err = sum(float(d[o] @ hs[o // per] @ d[o]) for o in range(n))
    cells = ops.encode(torch.gather(q, 1, index).contiguous(), bits, b, enc)
    has = pred >= 0
    writes = int((cells[has] != cells[pred[has]]).sum())
    return err + penalty * writes


@settings(max_examples=80, deadline=None)
@given(out=st.integers(0, 5), k=st.integers(0, 7), groups=st.sampled_from([1, 2]),
       bits=st.integers(2, 8), b=st.sampled_from([1, 2, 4]), enc=st.integers(0, 2),
       penalty=st.sampled_from([0.0, 0.3, 1.0, 4.0]), sweeps=st.integers(0, 3),
       seed=st.integers(0, 2 ** 16))
def test_kernel_reference_independent_agree(out, k, groups, bits, b, enc, penalty, sweeps,
                                            seed):
    if b > (bits - 1 if enc == 0 else bits):
        b = 1
    t, hs, q, pred, index = _case(out, k, groups, bits, seed)
    got, forms = ops.feedback_refine(t, hs, q, pred, index, bits, b, enc, penalty, sweeps,
                                     forms=True)
    want, want_forms = reference.feedback_refine(t, hs, q, pred, index, bits, b, enc, penalty,
                                                 sweeps, forms=True)
    assert got.dtype == torch.int32 and torch.equal(got, want)
    # each filter's d . g, the running products as the sweeps leave them: the same bits, and
    # d^T Hs d of the refined integers up to the running sums' rounding
    assert forms.dtype == torch.float64 and torch.equal(forms, want_forms)
    assert forms.shape == ((out * groups,) if sweeps else (0,))
    if sweeps and forms.numel():
        d = got.double() - t
        per = d.shape[0] // hs.shape[0]
        exact = torch.stack([d[o] @ hs[o // per] @ d[o] for o in range(d.shape[0])])
        assert torch.allclose(forms, exact, rtol=1e-9, atol=1e-9 * float(exact.abs().max()))
    sim = ind.refine_layer(t.tolist(), [h.tolist() for h in hs], q.tolist(), bits, b,
                           ENCODINGS[enc], pred.tolist(), index.tolist(), penalty, sweeps)
    assert got.tolist() == sim
    # J does not rise (up to the rounding of the running g), and falls where anything moved
    before = _objective(t, hs, q, pred, index, bits, b, enc, penalty)
    after = _objective(t, hs, got, pred, index, bits, b, enc, penalty)
    assert after <= before + 1e-9 * (1 + abs(before))
    if not torch.equal(got, q):
        assert after < before


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_many_filters_long_rows_and_threads_agree_with_the_reference(threads):
    """The kernel initialises g 16 filters at a time and runs each half's filters in parallel:
    more filters than a block, three groups, long chains and one to three threads give the
    reference's integers."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t, hs, q, pred, index = _case(21, 40, 3, 8, 11)
        pred = _chains(63, 5, p=0.95)
        for penalty, sweeps in ((0.0, 2), (1.5, 3)):
            got = ops.feedback_refine(t, hs, q, pred, index, 8, 1, 0, penalty, sweeps)
            want = reference.feedback_refine(t, hs, q, pred, index, 8, 1, 0, penalty, sweeps)
            assert torch.equal(got, want)
            assert int((got != q).sum()) > 0  # the case exercises moves
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("n, k, groups", [(13, 300, 1), (10, 530, 2)])
def test_rows_longer_than_a_panel_agree_with_the_reference(n, k, groups):
    """The running products go through Hs in panels of 256 rows by 512 columns, four filters
    by eight columns at a time: rows that cross panels, columns and filters past the last full
    block, and groups, give the reference's integers."""
    t, hs, q, _, index = _case(n, k, groups, 8, 3)
    pred = _chains(n * groups, 4, p=0.9)
    got = ops.feedback_refine(t, hs, q, pred, index, 8, 1, 0, 1.5, 2)
    want = reference.feedback_refine(t, hs, q, pred, index, 8, 1, 0, 1.5, 2)
    assert torch.equal(got, want) and int((got != q).sum()) > 0


def test_hand_case():
    """Worked by hand (8-bit differential, 1-bit cells: 4 and 5 differ in one cell, 3 and 4 in
    three). Filter 1 follows filter 0; Hs = [[1]]; penalty 10.
    Filter 0 (even depth) holds 5 at target 5: g = 0. Moving to 4 costs 2*(-1)*0 + 1 = 1 in
    error and saves the one cell it differs in from its successor's 4: 1 - 10 = -9; to 6:
    1 + 0 (6 and 4 differ in one cell too); to 3: 4 + 10 * (3 - 1) = 24. It moves to 4.
    Filter 1 (odd depth) then already holds its predecessor's value: staying costs nothing,
    moving to 5 costs 2*(-0.4) + 1 + 10 = 10.2."""
    t = torch.tensor([[5.0], [4.4]], dtype=torch.float64)
    q = torch.tensor([[5], [4]], dtype=torch.int32)
    hs = torch.ones(1, 1, 1, dtype=torch.float64)
    pred = torch.tensor([-1, 0])
    index = torch.zeros(2, 1, dtype=torch.int64)
    got = ops.feedback_refine(t, hs, q, pred, index, 8, 1, 0, 10.0, 1)
    assert got.tolist() == [[4], [4]]
    # without a penalty each weight only nears its target: 5 stays, 4 stays (4.4 is nearer 4)
    assert ops.feedback_refine(t, hs, q, pred, index, 8, 1, 0, 0.0, 1).tolist() == [[5], [4]]
    # the error alone: two weights 2 LSB off a correlated pair move back together
    t2 = torch.zeros(1, 2, dtype=torch.float64)
    q2 = torch.tensor([[2, 0]], dtype=torch.int32)
    eye = torch.eye(2, dtype=torch.float64)[None]
    # g = (2, 0): to 0 costs -8 + 4 = -4, to 1 costs -3, to -1 costs 12 + 9 > 0: 2 -> 0
    assert ops.feedback_refine(t2, eye, q2, torch.tensor([-1]), torch.tensor([[0, 1]]), 8, 1, 0,
                               0.0, 1).tolist() == [[0, 0]]


def test_bad_arguments_are_refused():
    t = torch.zeros(3, 2, dtype=torch.float64)
    hs = torch.eye(2, dtype=torch.float64)[None]
    q = torch.zeros(3, 2, dtype=torch.int32)
    pred = torch.tensor([-1, 0, 1])
    index = torch.tensor([[0, 1]] * 3)
    args = (8, 1, 0, 1.0, 2)
    with pytest.raises(RuntimeError, match="target must be Double"):
        ops.feedback_refine(t.float(), hs, q, pred, index, *args)
    with pytest.raises(RuntimeError, match="q must be Int"):
        ops.feedback_refine(t, hs, q.long(), pred, index, *args)
    with pytest.raises(RuntimeError, match="target holds NaN"):
        ops.feedback_refine(t.clone().fill_(float("nan")), hs, q, pred, index, *args)
    with pytest.raises(RuntimeError, match="hs holds NaN"):
        ops.feedback_refine(t, hs.clone().fill_(float("inf")), q, pred, index, *args)
    with pytest.raises(RuntimeError, match="symmetric range"):
        ops.feedback_refine(t, hs, q.clone().fill_(128), pred, index, *args)
    with pytest.raises(RuntimeError, match="multiple of the groups"):
        ops.feedback_refine(t, hs.expand(2, 2, 2).contiguous(), q, pred, index, *args)
    with pytest.raises(RuntimeError, match=r"q.size\(1\)"):
        ops.feedback_refine(t, hs, q[:, :1].contiguous(), pred, index, *args)
    with pytest.raises(RuntimeError, match="cycle"):
        ops.feedback_refine(t, hs, q, torch.tensor([2, 0, 1]), index, *args)
    with pytest.raises(RuntimeError, match="feedback_refine: filter 0 is the predecessor"):
        ops.feedback_refine(t, hs, q, torch.tensor([-1, 0, 0]), index, *args)
    with pytest.raises(RuntimeError, match="not a permutation"):
        ops.feedback_refine(t, hs, q, pred, torch.tensor([[0, 0]] * 3), *args)
    with pytest.raises(RuntimeError, match="sweeps must be in"):
        ops.feedback_refine(t, hs, q, pred, index, 8, 1, 0, 1.0, -1)
    with pytest.raises(RuntimeError, match="write_penalty"):
        ops.feedback_refine(t, hs, q, pred, index, 8, 1, 0, float("nan"), 1)
    with pytest.raises(RuntimeError, match="weight_bits"):
        ops.feedback_refine(t, hs, q, pred, index, 1, 1, 0, 1.0, 1)


def test_fake_kernel_shapes():
    t = torch.empty(4, 6, dtype=torch.float64, device="meta")
    hs = torch.empty(2, 6, 6, dtype=torch.float64, device="meta")
    q = torch.empty(4, 6, dtype=torch.int32, device="meta")
    pred = torch.empty(4, dtype=torch.int64, device="meta")
    index = torch.empty(4, 6, dtype=torch.int64, device="meta")
    out, forms = ops.feedback_refine(t, hs, q, pred, index, 8, 1, 0, 1.0, 2, forms=True)
    assert out.shape == (4, 6) and out.dtype == torch.int32 and out.is_meta
    assert forms.shape == (4,) and forms.dtype == torch.float64 and forms.is_meta
    assert ops.feedback_refine(t, hs, q, pred, index, 8, 1, 0, 1.0, 0, forms=True)[1].shape == (0,)
    with pytest.raises(Exception, match="multiple of the groups"):
        ops.feedback_refine(t[:3], hs, q[:3], pred[:3], index[:3], 8, 1, 0, 1.0, 2)


# ---- the layers --------------------------------------------------------------------------------

def _expected(layer, cfg, weights=None):
    """The simulator's integers: rule 23 (rule 21 without a penalty), then rule 24's sweeps;
    ``weights``: rule 25's filter weights (a list, or None)."""
    w = layer.matrix_weight().detach().float()
    t = (w / layer.scale[:, None]).double()
    u = [ind.feedback_factor(h, cfg.feedback_damp).tolist()
         for h in layer.input_moment.double().numpy()]
    idx = layer.sort_index.long().tolist()
    pred = _predecessors(layer, cfg)
    if cfg.write_penalty > 0:
        q = ind.write_aware_layer(t.tolist(), u, None, cfg.weight_bits, cfg.bits_per_cell,
                                  cfg.encoding, 0, pred, idx, cfg.write_penalty, weights)
    else:
        per = t.shape[0] // len(u)
        q = [ind.feedback_row(t[o].tolist(), u[o // per], None, cfg.weight_bits,
                              cfg.bits_per_cell, cfg.encoding, 0) for o in range(t.shape[0])]
    hs = scaled_moment(layer.input_moment, cfg.feedback_damp)  # rule 24: given Hs, exact
    return torch.tensor(ind.refine_layer(t.tolist(), [h.tolist() for h in hs], q,
                                         cfg.weight_bits, cfg.bits_per_cell, cfg.encoding, pred,
                                         idx, cfg.write_penalty, cfg.feedback_sweeps, weights),
                        dtype=torch.int32)


def _config(**kw):
    base = dict(rows=8, cols=28, sort="value", filter_order="chain", feedback="hessian",
                feedback_damp=0.1, feedback_sweeps=2, seed=3)
    base.update(kw)
    return xb.CrossbarConfig(**base)


@pytest.mark.parametrize("kw", [dict(write_penalty=1.5), dict(write_penalty=0.0),
                                dict(write_penalty=3.0, pool=2, encoding="twos_complement")])
def test_layers_compute_with_the_independent_choice(kw):
    torch.manual_seed(7)
    model = Tiny().eval()
    cfg = _config(**kw)
    xmodel = xb.convert(copy.deepcopy(model), cfg)
    xb.calibrate(xmodel, torch.randn(5, 4, 6, 6))
    layers = xb.crossbar_layers(xmodel)
    expected = {name: _expected(layer, cfg) for name, layer in layers}
    xb.reprogram(xmodel)
    moved = 0
    for name, layer in layers:
        assert torch.equal(layer.effective_q(), expected[name]), name
        plain = _config(**{**kw, "feedback_sweeps": 0})
        moved += int((expected[name] != _expected(layer, plain)).sum())
    assert moved > 0  # the sweeps changed something, so the check above tests them
    report = xb.reprogram_report(xmodel).to_dict()
    assert report["writes_per_pass"] == xb.program_model(xmodel).per_pass.writes


def test_sweeps_lower_the_objective_of_a_value_sorted_chained_layer():
    """The point of rule 24: on a layer mapped by value sort and chain placement with rule 23's
    penalty, the sweeps lower J (in-sample output error plus the penalty's writes to the
    predecessor) against rule 23 alone, and the writes the programming counts (rule 8) follow
    the write term down: here both the writes and J fall."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(96, 64)).eval()
    x = torch.rand(300, 96) + 0.2
    writes, objective = {}, {}
    for sweeps in (0, 3):
        cfg = xb.CrossbarConfig(rows=32, cols=28, sort="value", filter_order="chain",
                                feedback="hessian", feedback_damp=0.1, write_penalty=2.0,
                                feedback_sweeps=sweeps)
        xm = xb.convert(copy.deepcopy(model), cfg)
        xb.calibrate(xm, x)
        xb.reprogram(xm)
        writes[sweeps] = xb.reprogram_report(xm).to_dict()["writes_per_pass"]
        layer = xm[0]
        t = (layer.matrix_weight().detach().float() / layer.scale[:, None]).double()
        objective[sweeps] = _objective(
            t, scaled_moment(layer.input_moment, cfg.feedback_damp), layer.effective_q(),
            torch.tensor(_predecessors(layer, cfg)), layer.sort_index.long(), 8, 1, 0,
            cfg.write_penalty)
    assert objective[3] < 0.97 * objective[0], objective
    assert writes[3] < writes[0], writes


def test_config_fields_are_validated():
    with pytest.raises(ValueError, match="feedback_sweeps"):
        xb.CrossbarConfig(feedback_sweeps=2)  # needs feedback
    for bad in (-1, 101, 1.5, True, "x"):
        with pytest.raises(ValueError, match="feedback_sweeps"):
            xb.CrossbarConfig(feedback="hessian", feedback_sweeps=bad)
    with pytest.raises(ValueError, match="feedback_sweeps"):
        xb.CrossbarConfig(feedback="hessian", feedback_sweeps=2, stuck_slices=1,
                          reprogram_fraction=0.0, compensate=True)
    cfg = xb.CrossbarConfig(feedback="hessian", feedback_sweeps="3")
    assert cfg.feedback_sweeps == 3 and cfg.baseline().feedback_sweeps == 0
    assert xb.CrossbarConfig.from_dict(cfg.to_dict()) == cfg
    over = xb.CrossbarConfig(feedback="hessian", layer_overrides={"fc*": {"feedback_sweeps": 2}})
    assert over.for_layer("fc1").feedback_sweeps == 2 and over.for_layer("x").feedback_sweeps == 0
    # a layer that sticks cells cannot keep the model's sweeps: named with its pattern
    with pytest.raises(ValueError, match=r"layer_overrides\['fc\*'\].*feedback_sweeps"):
        xb.CrossbarConfig(feedback="hessian", feedback_sweeps=2, compensate=True,
                          layer_overrides={"fc*": {"stuck_slices": 1, "reprogram_fraction": 0.0}})
