"""Rule 26 (docs/semantics.md): output gains, and the filter weights they give.

* ``calibrate_gains`` measures the *float* model's Jacobian energy per output channel: exactly
  (Rademacher probes are exact where each row reaches one output) against per-row derivatives
  taken here from the float model with ``torch.autograd``, for Linear and Conv2d layers, an
  inplace activation after a layer, stuck cells and the analog periphery (which the float model
  has not); with many probes, within the estimator's spread where outputs mix;
* the weights ``s^2 g`` over the lower median of the positive ones == tests/independent.py;
* programmed layers compute with exactly the integers the simulator chooses with those
  weights; the gains round-trip through the state dict, and bad ones are refused;
* bad input (no gains, a run without gradients, bad probes) gets one clear error.
"""
import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import crossbar_torch as xb
from crossbar_torch.errors import InvalidTensorError, ModelStateError, UserInputError
from crossbar_torch.feedback import filter_weights
from crossbar_torch.nn.gains import rademacher_probes

import independent as ind
from test_filter_weight import Spread
from test_refine import _expected as _refine_expected


def _per_row_energy(model, x, name):
    """sum over rows of sum_j (dZ_j / dy[row, o])^2 for module ``name`` of the float ``model``
    and ``Z = model(x)``: every element of Z differentiated on its own (a basis, not probes)."""
    module = dict(model.named_modules())[name]
    outs = []
    h = module.register_forward_hook(lambda m, a, out: outs.append(out) or out.clone())
    try:
        with torch.enable_grad():
            z = model(x)
            total = None
            for j in range(z.numel()):
                (g,) = torch.autograd.grad(z.reshape(-1)[j], outs[0], retain_graph=True)
                dim = 1 if isinstance(module, nn.Conv2d) else -1
                g = g.double().movedim(dim, -1)
                e = g.reshape(-1, g.shape[-1]).square().sum(0)
                total = e if total is None else total + e
    finally:
        h.remove()
    return total


class Scalar(nn.Module):
    """Each sample's one output depends on that sample's rows alone: Rademacher probes are
    then exact ((+-1)^2 = 1), so the gains equal the Jacobian energy."""

    def __init__(self, conv=False, inplace=False):
        super().__init__()
        self.conv = conv
        if conv:
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 2, 3, stride=2)
            self.head = nn.Linear(2 * 2 * 2, 1)
        else:
            self.a = nn.Linear(6, 5)
            self.b = nn.Linear(5, 4)
            self.head = nn.Linear(4, 1)
        self.act = nn.ReLU(inplace=True) if inplace else nn.GELU()

    def forward(self, x):
        y = self.b(self.act(self.a(x)))
        return self.head(torch.tanh(y).flatten(1))


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("kw", [dict(), dict(stuck_slices=2, reprogram_fraction=0.0,
                                            compensate=True),
                                dict(input_bits=4, adc_bits=6)])
def test_gains_are_the_float_models_jacobian_energy(conv, kw):
    torch.manual_seed(1)
    model = Scalar(conv=conv, inplace=not conv).eval()
    x = torch.randn(5, 3, 6, 6) if conv else torch.randn(7, 6) + 0.3
    cfg = xb.CrossbarConfig(rows=8, cols=28, feedback="hessian", write_penalty=1.0,
                            filter_weight="gain", **kw)
    xm = xb.convert(copy.deepcopy(model), cfg)
    if cfg.analog:
        xb.calibrate(xm, x)
    gains = xb.calibrate_gains(xm, run=lambda m: m(x), probes=3)
    for name in ("a", "b", "head"):
        want = _per_row_energy(model, x, name)
        got = dict(xb.crossbar_layers(xm))[name].output_gain
        assert got.dtype == torch.float64 and torch.equal(got, gains[name])
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-12), name
    # the crossbar model (stuck cells, a periphery) computes otherwise: not what was measured
    with torch.no_grad():
        assert xm.training is False and torch.isfinite(xm(x)).all()


def test_gains_estimate_the_energy_where_outputs_mix():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).eval()
    x = torch.randn(3, 5)
    xm = xb.convert(copy.deepcopy(model), xb.CrossbarConfig(feedback="hessian"))
    xb.calibrate_gains(xm, run=lambda m: m(x).sum(0), probes=4000)  # rows mix into one Z
    got = dict(xb.crossbar_layers(xm))["0"].output_gain
    want = _per_row_energy(model, x, "0")
    # E[(J^T r)^2] = sum_j J_j^2; the cross terms average out as 1 / sqrt(probes)
    assert torch.allclose(got, want, rtol=0.1)
    assert not torch.allclose(got, want, rtol=1e-6)  # probes, not a basis, were used


def test_probes_are_seeded_rademacher_and_the_model_is_left_as_it_was():
    r = list(rademacher_probes((3, 4), 2, seed=5))
    assert all(set(t.unique().tolist()) <= {-1.0, 1.0} for t in r)
    assert all(torch.equal(a, b) for a, b in zip(r, rademacher_probes((3, 4), 2, seed=5)))
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4))
    x = torch.randn(3, 5)
    xm = xb.convert(model, xb.CrossbarConfig(feedback="hessian"))
    for p in xm.parameters():  # a frozen model: its layers' outputs are measured all the same
        p.requires_grad_(False)
    xm.train()
    first = xb.calibrate_gains(xm, run=lambda m: m(x).sum(0))
    again = xb.calibrate_gains(xm, run=lambda m: m(x).sum(0))
    other = xb.calibrate_gains(xm, run=lambda m: m(x).sum(0), seed=1)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first)
    assert xm.training and not any(p.requires_grad for p in xm.parameters())
    assert all(p.grad is None for p in xm.parameters())


@settings(max_examples=80, deadline=None)
@given(scales=st.lists(st.floats(1e-6, 1e6), min_size=0, max_size=9),
       data=st.data())
def test_gain_weights_equal_the_independent_rule(scales, data):
    gains = data.draw(st.lists(st.sampled_from([0.0, 1e-9, 0.3, 1.0, 7.5, 1e5]),
                               min_size=len(scales), max_size=len(scales)))
    s = torch.tensor(scales, dtype=torch.float32)
    g = torch.tensor(gains, dtype=torch.float64)
    got = filter_weights(s, g)
    assert got.dtype == torch.float64
    assert got.tolist() == ind.filter_weights(s.tolist(), g.tolist())


def test_gain_weights_edge_cases():
    s = torch.tensor([1.0, 2.0, 3.0])
    assert filter_weights(s, torch.zeros(3)).tolist() == [1.0, 1.0, 1.0]  # reaches nothing
    # a channel that never reaches the output: as dear to write as the rule allows
    assert filter_weights(s, torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64))[0] == 1e-12


@pytest.mark.parametrize("sweeps", [0, 2])
def test_layers_compute_with_the_independent_choice(sweeps):
    torch.manual_seed(7)
    model = Spread().eval()
    cfg = xb.CrossbarConfig(rows=8, cols=28, sort="value", filter_order="chain",
                            feedback="hessian", feedback_damp=0.1, write_penalty=2.0, seed=3,
                            feedback_sweeps=sweeps, filter_weight="gain")
    xmodel = xb.convert(copy.deepcopy(model), cfg)
    x = torch.randn(5, 4, 6, 6)
    xb.calibrate(xmodel, x)
    with pytest.raises(ModelStateError, match="calibrate_gains"):
        xb.reprogram(xmodel)
    xb.calibrate_gains(xmodel, run=lambda m: m(x))
    layers = xb.crossbar_layers(xmodel)
    expected, by_scale = {}, {}
    for name, layer in layers:
        a = ind.filter_weights(layer.scale.tolist(), layer.output_gain.tolist())
        expected[name] = _refine_expected(layer, cfg, a)
        by_scale[name] = _refine_expected(layer, cfg, ind.filter_weights(layer.scale.tolist()))
    xb.reprogram(xmodel)
    for name, layer in layers:
        assert torch.equal(layer.effective_q(), expected[name]), name
    assert any(not torch.equal(expected[n], by_scale[n]) for n in expected)  # gains mattered
    # the gains travel with the model: a fresh conversion loads them and programs the same
    state = xmodel.state_dict()
    again = xb.convert(copy.deepcopy(model), cfg)
    again.load_state_dict(state)
    xb.reprogram(again)
    for (name, layer), (_, other) in zip(layers, xb.crossbar_layers(again)):
        assert torch.equal(layer.output_gain, other.output_gain)
        assert torch.equal(layer.effective_q(), other.effective_q()), name


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([1.0, -1.0]).double(), "negative"),
    (torch.tensor([1.0, float("nan")]).double(), "NaN"),
    (torch.tensor([1.0, 2.0]), "dtype"),
    (torch.ones(3, dtype=torch.float64), "shape")])
def test_bad_loaded_gains_are_refused(bad, match):
    xm = xb.convert(nn.Linear(3, 2), xb.CrossbarConfig(feedback="hessian"))
    state = xm.state_dict()
    state["output_gain"] = bad
    with pytest.raises(RuntimeError, match=f"output_gain.*{match}"):
        xm.load_state_dict(state)


def test_bad_calls_are_refused():
    x = torch.randn(3, 5)
    xm = xb.convert(nn.Linear(5, 2), xb.CrossbarConfig(feedback="hessian"))
    with pytest.raises(InvalidTensorError, match="does not require grad"):
        xb.calibrate_gains(xm, run=lambda m: m(x).detach())
    with pytest.raises(InvalidTensorError, match="float tensor"):
        xb.calibrate_gains(xm, run=lambda m: None)
    with pytest.raises(UserInputError, match="probes"):
        xb.calibrate_gains(xm, run=lambda m: m(x), probes=0)
    with pytest.raises(UserInputError, match="seed"):
        xb.calibrate_gains(xm, run=lambda m: m(x), seed=-1)
    with pytest.raises(UserInputError, match="callable"):
        xb.calibrate_gains(xm, run=x)
    with pytest.raises(Exception, match="calibrate_gains"):
        xb.calibrate_gains(nn.Linear(5, 2), run=lambda m: m(x))
    with pytest.raises(ValueError, match="filter_weight"):
        xb.CrossbarConfig(filter_weight="gain")  # needs feedback


def test_the_scripts_image_calibration_measures_the_logits_gains():
    """``calibrate_from_loader`` (eval_imagenet.py, finetune.py) measures rule 26's gains on the
    images it calibrates on, where a layer asks for them, and only there."""
    from crossbar_torch.nn.calibration import calibrate_from_loader
    torch.manual_seed(4)
    model = Scalar(conv=True).eval()
    x = torch.randn(5, 3, 6, 6)
    loader = [(x[:3], torch.zeros(3)), (x[3:], torch.zeros(2))]
    for fw, gained in (("gain", True), ("scale", False)):
        cfg = xb.CrossbarConfig(rows=8, cols=28, feedback="hessian", write_penalty=1.0,
                                filter_weight=fw)
        xm = xb.convert(copy.deepcopy(model), cfg)
        assert calibrate_from_loader(xm, loader, "cpu", images=4) == 4
        got = {n: layer.output_gain for n, layer in xb.crossbar_layers(xm)}
        if not gained:
            assert all(g.numel() == 0 for g in got.values())
            continue
        for name in got:
            assert torch.allclose(got[name], _per_row_energy(model, x[:4], name), rtol=1e-4)
        xb.reprogram(xm)
