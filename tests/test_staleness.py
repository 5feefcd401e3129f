"""State that cannot go stale (issue 17): caches of what the held cells give follow in-place
edits of the tensors they derive from; a change of the latent weight is detected exactly (a
permutation or a sign-balanced change too), also under torch.compile; a layer built directly
refuses to run until it is programmed; a state dict carries the device's values.

The reference for effective weights is tests/independent.py (decode, un-sort, scale)."""
import copy
import gc
import warnings

import pytest
import torch
import torch.nn as nn

import crossbar_torch as xb
from crossbar_torch.errors import ModelStateError

import independent as ind


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))


def _cfg(**kw):
    return xb.CrossbarConfig(rows=8, cols=16, **kw)


def _expected_weight(layer):
    """Decoded held cells, un-sorted, times scale, computed independently."""
    cfg = layer.config
    cells = layer.held_cells().to(torch.int64).tolist()
    idx = layer.sort_index.to(torch.int64).tolist()
    out = torch.empty(layer.cells.shape[0], layer.cells.shape[1], dtype=torch.float32)
    for o, row in enumerate(cells):
        for k_sorted, c in enumerate(row):
            q = ind.decode_one(c, cfg.weight_bits, cfg.bits_per_cell, cfg.encoding)
            out[o, idx[o][k_sorted]] = q
    return (out * layer.scale[:, None]).reshape(layer.weight.shape)


def _convert():
    xm = xb.convert(_model(), _cfg(sort="value")).eval()
    return xm, xb.crossbar_layers(xm)[0][1]


@pytest.mark.parametrize("what", ["cells", "scale", "sort_index"])
def test_in_place_edit_of_a_held_tensor_reaches_eval(what):
    xm, layer = _convert()
    x = torch.randn(3, 12)
    xm(x)  # fills the cache
    with torch.no_grad():
        if what == "cells":
            layer.cells[0, 0, 0] ^= 1  # one cell flips (level 0 <-> 1, 1-bit cells)
        elif what == "scale":
            layer.scale.mul_(2.0)
        else:
            layer.sort_index[0] = layer.sort_index[0].flip(0)
    assert torch.equal(layer.effective_weight(), _expected_weight(layer))
    first = xm[0]
    ref = torch.nn.functional.linear(x, _expected_weight(layer), first.bias)
    assert torch.allclose(first(x), ref, atol=1e-6)


def test_cache_is_kept_while_nothing_changes():
    _, layer = _convert()
    w1 = layer.effective_weight()
    assert layer.effective_weight() is w1  # not recomputed
    with torch.no_grad():
        layer.cells.add_(0)  # an in-place op bumps the version even with equal values
    assert layer.effective_weight() is not w1


def _warns_stale(xm, x):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        xm(x)
    return any("latent weight changed" in str(w.message) for w in seen)


@pytest.mark.parametrize("change", ["permute", "sign_balanced", "none"])
def test_latent_weight_change_in_a_new_object_is_detected_exactly(change):
    """A deepcopy holds new tensor objects: the values decide, bit for bit. A permutation of
    the weights and a +d / -d pair keep a float sum unchanged; both are changes."""
    xm, _ = _convert()
    cp = copy.deepcopy(xm)
    layer = xb.crossbar_layers(cp)[0][1]
    w = layer.weight.detach().clone()
    if change == "permute":
        w = w.flatten()[torch.randperm(w.numel(), generator=torch.Generator().manual_seed(1))]
        w = w.reshape(layer.weight.shape)
    elif change == "sign_balanced":
        w[0, 0] += 0.25
        w[0, 1] -= 0.25
    # a new Parameter object: no version counter to follow
    layer.weight = nn.Parameter(w)
    assert _warns_stale(cp, torch.randn(2, 12)) == (change != "none")


def test_reused_ids_do_not_hide_a_change():
    """The stamp holds a weak reference, not an id(): a new tensor that happens to reuse the
    address of the programmed one (freed) is still compared by value."""
    xm, layer = _convert()
    old_id = id(layer.weight)
    layer.weight = None
    gc.collect()
    for _ in range(200):  # try to land a new tensor at the same address
        p = nn.Parameter(torch.zeros(10, 12))
        if id(p) == old_id:
            break
    layer.weight = p
    assert _warns_stale(xm, torch.randn(2, 12))


def test_change_is_detected_under_torch_compile():
    """Inside a compiled graph the check would break the graph at every layer; it is made when
    the model is switched to eval (eagerly), the moment a fine-tuned weight starts to matter."""
    xm, layer = _convert()
    compiled = torch.compile(xm, backend="eager")
    x = torch.randn(2, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled(x)
        compiled.eval()
    with torch.no_grad():
        layer.weight.add_(1.0)
    with pytest.warns(UserWarning, match="latent weight changed"):
        compiled.eval()


def test_directly_built_layer_refuses_to_run_until_programmed():
    lin = xb.CrossbarLinear(12, 10, config=_cfg())
    with pytest.raises(ModelStateError, match="never programmed.*from_linear"):
        lin(torch.randn(2, 12))
    lin.train()
    with pytest.raises(ModelStateError, match="never programmed"):
        lin(torch.randn(2, 12))
    conv = xb.CrossbarConv2d(3, 4, 3, config=_cfg())
    with pytest.raises(ModelStateError, match="from_conv"):
        conv(torch.randn(1, 3, 5, 5))
    # programmed by loading a converted layer's state
    src = xb.CrossbarLinear.from_linear(nn.Linear(12, 10), _cfg())
    lin.load_state_dict(src.state_dict())
    lin.eval()
    assert torch.equal(lin(torch.ones(1, 12)), src.eval()(torch.ones(1, 12)))


def test_state_dict_carries_the_device_values_not_the_name():
    xm, layer = _convert()
    saved = layer.state_dict()["_extra_state"]["crossbar_config"]["device"]
    assert isinstance(saved, dict) and saved["source"] == ""
    assert saved == {**layer.config.load_device().to_dict(), "source": ""}
    twin = xb.convert(_model(), _cfg(sort="value"))
    twin.load_state_dict(xm.state_dict())  # loads back into a model made with the name


def test_reprogramming_after_an_in_place_edit_records_the_new_bytes():
    """Reprogramming keeps the digest it has while the weight is the same object at the same
    version (no second hash of the same bytes); after an in-place edit it hashes them again, so
    a later object holding the edited values is not stale and one holding the old values is."""
    xm, layer = _convert()
    before = layer._programmed_digest
    xb.reprogram(xm)  # unchanged: the digest kept
    assert layer._programmed_digest == before
    old = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight[0, 0] += 0.5  # in place: a new version
    xb.reprogram(xm)
    assert layer._programmed_digest != before
    for values, stale in ((layer.weight.detach().clone(), False), (old, True)):
        layer.weight = nn.Parameter(values.clone())  # another object: the bytes decide
        assert _warns_stale(xm, torch.randn(2, 12)) == stale
        xb.reprogram(xm)  # programmed from these values again
