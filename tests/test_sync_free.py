"""The hot path trusts what it checked (issue 19): a crossbar layer's ops check the values of the
held tensors (levels in range, the sort index a permutation, finite floats) on their first call
after those tensors changed, not on every forward: on CUDA such a check is a host
synchronisation. On CPU the test watches the ``check_values`` flags the layer passes; on a GPU,
``torch.cuda.set_sync_debug_mode("error")`` turns any synchronisation into an error."""
import pytest
import torch
import torch.nn as nn

import crossbar_torch as xb
import crossbar_torch.ops as ops

from conftest import DEVICES

HELD_OPS = ("sort_and_encode", "effective_weight", "compensate", "decode", "analog_matmul")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 8))


def _stucking():
    return xb.CrossbarConfig(rows=16, cols=16, sort="value", stuck_slices=2,
                             reprogram_fraction=0.25, compensate=True)


@pytest.fixture
def spy(monkeypatch):
    calls = []
    for name in HELD_OPS:
        real = getattr(ops, name)

        def wrapped(*a, _real=real, _name=name, check_values=True, **k):
            calls.append((_name, check_values))
            return _real(*a, check_values=check_values, **k)
        monkeypatch.setattr(ops, name, wrapped)
    return calls


def _checked(calls):
    return sorted({n for n, c in calls if c})


def test_training_forward_checks_once_per_change(spy):
    xm = xb.convert(_model(), _stucking()).train()
    opt = torch.optim.SGD(xm.parameters(), lr=1e-2)
    x = torch.randn(4, 24)
    xm(x).sum().backward()
    assert _checked(spy) == ["compensate", "effective_weight", "sort_and_encode"]
    spy.clear()
    for _ in range(3):  # the latent weights change every step; the held tensors do not
        opt.step()
        opt.zero_grad()
        xm(x).sum().backward()
    assert spy and _checked(spy) == []
    layer = xb.crossbar_layers(xm)[0][1]
    with torch.no_grad():
        layer.sort_index[0] = layer.sort_index[0].roll(1)  # still a permutation
    spy.clear()
    xm(x)
    # the edited layer checks again, once; the other layer still trusts its unchanged tensors
    assert sorted(n for n, c in spy if c) == ["compensate", "effective_weight", "sort_and_encode"]


def test_a_bad_in_place_edit_is_still_caught():
    xm = xb.convert(_model(), _stucking()).train()
    x = torch.randn(4, 24)
    xm(x)
    layer = xb.crossbar_layers(xm)[0][1]
    with torch.no_grad():
        layer.sort_index[0, 0] = layer.sort_index[0, 1]  # a repeated index: not a permutation
    with pytest.raises(RuntimeError, match="permutation"):
        xm(x)
    with torch.no_grad():
        layer.sort_index[0] = torch.arange(24)
        layer.scale[0] = float("nan")  # scales are finite and positive
    with pytest.raises(RuntimeError, match="scale"):
        xm(x)


def test_eval_forward_checks_once(spy):
    xm = xb.convert(_model(), xb.CrossbarConfig(rows=16, cols=16, sort="value")).eval()
    x = torch.randn(4, 24)
    xm(x)
    assert "effective_weight" in _checked(spy)
    spy.clear()
    xm(x)
    xm(x)
    assert _checked(spy) == []


def test_analog_forward_checks_once(spy):
    cfg = xb.CrossbarConfig(rows=16, cols=16, sort="value", adc_bits=8, input_bits=8)
    xm = xb.convert(_model(), cfg).eval()
    x = torch.randn(4, 24)
    xb.calibrate(xm, x)  # the calibrating forward checks what it reads
    assert "analog_matmul" in _checked(spy)
    spy.clear()
    y = xm(x)
    assert spy and _checked(spy) == []
    layer = xb.crossbar_layers(xm)[0][1]
    with torch.no_grad():
        layer.adc_range.mul_(1.0)  # an in-place edit (same values): checked again, once
    spy.clear()
    assert torch.equal(xm(x), y)
    assert [n for n, c in spy if c] == ["analog_matmul"]


@pytest.mark.parametrize("device", [d for d in DEVICES if getattr(d, "values", [d])[0] == "cuda"])
def test_cuda_forward_makes_no_host_synchronisation(device):
    xm = xb.convert(_model(), _stucking()).to(device)
    x = torch.randn(64, 24, device=device)
    xm.train()
    xm(x).sum().backward()  # first calls check the held values
    xm.eval()
    xm(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        xm.train()
        xm(x).sum().backward()
        xm.eval()
        with torch.no_grad():
            xm(x)
    finally:
        torch.cuda.set_sync_debug_mode(0)
