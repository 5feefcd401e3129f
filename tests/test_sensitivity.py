"""The allocator's output gains (crossbar_torch/sensitivity.py) against Jacobians computed by
torch.autograd.functional.jacobian, independently of the backward-pass estimator: exact with
probes=None (to float64 rounding), unbiased with probes (within the probe spread)."""
import copy

import pytest
import torch
import torch.nn as nn

from crossbar_torch.sensitivity import LayerGain, output_gains


class _Branchy(nn.Module):
    """Two paths to the output, a layer nobody reads, one layer called twice, 3-d rows."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5, 5)
        self.c = nn.Linear(5, 4)
        self.unused = nn.Linear(6, 3)

    def forward(self, x):
        self.unused(x)
        h = torch.tanh(self.a(x))
        h = self.b(torch.tanh(self.b(h)))  # b twice
        return (self.c(h) * 2.0).mean(1)   # pooled over the middle (token) axis


def _jacobian_norms(model, x, name):
    """(||J||_F^2, ||sum_rows J_row||_F^2, ||Z||^2, mean input row) for module `name`, every
    call of it together, by autograd.functional.jacobian with that call's output swapped for an
    input of the same value."""
    model = copy.deepcopy(model).double()
    x = x.double()
    mod = dict(model.named_modules())[name]
    calls, inputs = [], []

    def record(m, a, out):  # returns None: the output stays
        calls.append(out.detach())
        inputs.append(a[0].detach())
    h = mod.register_forward_hook(record)
    with torch.no_grad():
        z = model(x)
    h.remove()
    full, summed = 0.0, None
    for i, y0 in enumerate(calls):
        def f(y, i=i):
            seen = [0]

            def swap(m, a, out):
                seen[0] += 1
                return y if seen[0] - 1 == i else out
            hh = mod.register_forward_hook(swap)
            try:
                return model(x)
            finally:
                hh.remove()
        jac = torch.autograd.functional.jacobian(f, y0)  # (*Z, *rows, out)
        jac = jac.reshape(z.numel(), -1, y0.shape[-1])
        full += float(jac.pow(2).sum())
        summed = jac.sum(1) if summed is None else summed + jac.sum(1)
    rows = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs])
    return full, float(summed.pow(2).sum()), float(z.pow(2).sum()), rows.mean(0)


def test_exact_gains_are_the_jacobian_norms():
    torch.manual_seed(0)
    model = _Branchy().double().train()
    x = torch.randn(3, 7, 6, dtype=torch.float64)
    got = output_gains(model, lambda m: m(x), ["a", "b", "c", "unused"], probes=None)
    for n in ("a", "b", "c"):
        full, summed, zz, mean = _jacobian_norms(model, x, n)
        out = dict(model.named_modules())[n].out_features
        assert got[n].spread == pytest.approx(full / (out * zz), rel=1e-9)
        assert got[n].coherent == pytest.approx(summed / (out * zz), rel=1e-9)
        torch.testing.assert_close(got[n].mean, mean, rtol=1e-12, atol=1e-12)
    assert got["unused"].spread == 0.0 and got["unused"].coherent == 0.0  # never reaches Z
    # the model is as it was: no parameter gradient, flags and mode kept
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert model.training


def test_probe_estimates_are_close_and_seeded():
    torch.manual_seed(1)
    model = _Branchy()
    x = torch.randn(8, 5, 6)
    exact = output_gains(model, lambda m: m(x), ["a", "c"], probes=None)
    est = output_gains(model, lambda m: m(x), ["a", "c"], probes=400, seed=3)
    for n in ("a", "c"):  # Hutchinson: unbiased, relative spread about sqrt(2 / 400) or less
        assert est[n].spread == pytest.approx(exact[n].spread, rel=0.2)
        assert est[n].coherent == pytest.approx(exact[n].coherent, rel=0.2)
    again = output_gains(model, lambda m: m(x), ["a", "c"], probes=400, seed=3)
    assert all(again[n].spread == est[n].spread for n in ("a", "c"))


def test_bad_layers_are_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match="no module named"):
        output_gains(model, lambda m: m(torch.randn(1, 3, 5, 5)), ["nope"])
    with pytest.raises(ValueError, match="Linear layers only"):
        output_gains(model, lambda m: m(torch.randn(1, 3, 5, 5)), ["0"])


def test_layer_gain_error_splits_shared_and_varying():
    g = LayerGain(spread=2.0, coherent=50.0, mean=torch.tensor([1.0, 0.0], dtype=torch.float64))
    e = torch.tensor([[0.1, 0.3]], dtype=torch.float64)
    assert g.error(e, energy=0.05) == pytest.approx(2.0 * (0.05 - 0.01) + 50.0 * 0.01)
    assert g.error(e, energy=0.005) == pytest.approx(50.0 * 0.01)  # never a negative part
