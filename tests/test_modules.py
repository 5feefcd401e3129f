"""Crossbar layers as PyTorch modules: state_dict round trips, devices and dtypes, saving,
train / eval, compile tracing, bad input."""
import io
import os

import pytest
import torch
import torch.nn as nn

import crossbar_torch as xb
from crossbar_torch.packing import unpack_levels
from conftest import SAMPLE_DATA


def small_cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, groups=2, padding=1), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 10))


STUCK = xb.CrossbarConfig(rows=16, cols=32, stuck_slices=3, reprogram_fraction=0.4, pool=2)


@pytest.mark.parametrize("cfg", [xb.CrossbarConfig(), STUCK])
def test_state_dict_round_trip_gives_identical_outputs(tmp_path, cfg):
    m = small_cnn()
    xm = xb.convert(m, cfg).eval()
    x = torch.randn(2, 3, 6, 6)
    path = tmp_path / "sd.pt"
    torch.save(xm.state_dict(), path)
    fresh = xb.convert(small_cnn(), cfg).eval()   # different random weights
    assert not torch.equal(fresh(x), xm(x))
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(fresh(x), xm(x))
    for (_, a), (_, b) in zip(xb.crossbar_layers(xm), xb.crossbar_layers(fresh)):
        for k in ("cells", "sort_index", "scale", "stuck"):
            assert torch.equal(getattr(a, k), getattr(b, k)), k
    # and the counts replay exactly after loading
    assert xb.reprogram_report(fresh).to_dict() == xb.reprogram_report(xm).to_dict()


def test_loading_a_state_dict_of_another_config_fails_clearly():
    xm = xb.convert(small_cnn(), STUCK)
    other = xb.convert(small_cnn(), STUCK.replace(encoding="twos_complement"))
    with pytest.raises(RuntimeError, match="different CrossbarConfig.*encoding"):
        other.load_state_dict(xm.state_dict())


def test_counting_fields_may_differ_when_loading():
    """Issue 20 defect 13: device and wear_leveling only change how programming is counted
    (config.COUNTING_FIELDS), so a state dict loads into a model converted with other values
    of them; the loaded model keeps its own. Any other field is still refused."""
    base = xb.CrossbarConfig(rows=16, cols=32, sort="value")
    xm = xb.convert(small_cnn(), base.replace(device="rram", wear_leveling="rotate")).eval()
    other = xb.convert(small_cnn(), base).eval()
    other.load_state_dict(xm.state_dict())
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(other(x), xm(x))
    for _, layer in xb.crossbar_layers(other):
        assert (layer.config.device, layer.config.wear_leveling) == ("default", "none")
    with pytest.raises(RuntimeError, match="different CrossbarConfig.*sort"):
        xb.convert(small_cnn(), base.replace(sort="magnitude")).load_state_dict(xm.state_dict())


def test_whole_module_save_and_load():
    xm = xb.convert(small_cnn(), STUCK).eval()
    buf = io.BytesIO()
    torch.save(xm, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    x = torch.randn(1, 3, 6, 6)
    assert torch.equal(again(x), xm(x))


def test_to_dtype_keeps_float32_scales_and_cells():
    xm = xb.convert(small_cnn(), xb.CrossbarConfig())
    layer = xm[0]
    scale, cells = layer.scale.clone(), layer.cells.clone()
    w32 = layer.effective_weight().clone()
    xm.to(torch.float64)
    assert layer.scale.dtype == torch.float32 and torch.equal(layer.scale, scale)
    assert torch.equal(layer.cells, cells) and layer.weight.dtype == torch.float64
    assert torch.equal(layer.effective_weight(), w32.double())
    xm.to(torch.bfloat16).eval()
    out = xm(torch.randn(1, 3, 6, 6, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    xm.to("meta")
    assert layer.cells.device.type == "meta" and layer.scale.dtype == torch.float32


@pytest.mark.parametrize("make", [
    lambda dev: xb.CrossbarLinear(6, 5, config=xb.CrossbarConfig(), device=dev),
    lambda dev: xb.CrossbarConv2d(3, 4, 3, config=xb.CrossbarConfig(), device=dev)])
def test_buffers_are_made_on_the_weight_device(make):
    """A layer built for a device holds every buffer there: converting a model that lives on a
    GPU must not leave scales or sort indices on the host (the GPU check found exactly that)."""
    layer = make("meta")
    assert {b.device.type for _, b in layer.named_buffers()} == {"meta"}
    assert layer.weight.device.type == "meta"


def test_train_eval_modes():
    xm = xb.convert(small_cnn(), STUCK)
    x = torch.randn(2, 3, 6, 6)
    xm.eval()
    y_eval = xm(x)
    xm.train()
    y_train = xm(x)
    # nothing changed since programming: simulated programming gives the held cells, and the
    # straight-through forward computes with them bit for bit
    for _, layer in xb.crossbar_layers(xm):
        assert torch.equal(layer.simulated_weight(), layer.effective_weight())
    assert torch.equal(y_train, y_eval)
    y_train.sum().backward()
    assert all(p.grad is not None for p in xm.parameters())


def test_eval_warns_when_the_latent_weight_changed_since_programming():
    xm = xb.convert(small_cnn(), xb.CrossbarConfig()).eval()
    with torch.no_grad():
        xm[0].weight.mul_(2)
    with pytest.warns(UserWarning, match="reprogram"):
        xm(torch.randn(1, 3, 6, 6))


def test_torch_compile_traces_the_ops():
    xm = xb.convert(small_cnn(), STUCK).train()
    x = torch.randn(2, 3, 6, 6)
    expected = xm(x)
    from torch._dynamo.testing import CompileCounter
    cnt = CompileCounter()
    compiled = torch.compile(xm, backend=cnt, fullgraph=False)
    torch.testing.assert_close(compiled(x), expected)
    assert cnt.frame_count >= 1


def test_fake_kernels_give_shapes():
    from crossbar_torch import ops
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q = torch.empty(5, 7, dtype=torch.int32)
        cells = ops.encode(q, 8, 1, 0)
        assert cells.shape == (5, 7, 14) and cells.dtype == torch.uint8
        w = ops.effective_weight(cells, torch.empty(5, 7, dtype=torch.int64),
                                 torch.empty(5), 8, 1, 0)
        assert w.shape == (5, 7) and w.dtype == torch.float32


def test_nan_weights_are_refused():
    m = small_cnn()
    with torch.no_grad():
        m[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        xb.convert(m, xb.CrossbarConfig())


def test_config_type_checked():
    with pytest.raises(TypeError, match="CrossbarConfig"):
        xb.convert(small_cnn(), {"rows": 3})


def test_convert_without_crossbar_layers_to_report():
    with pytest.raises(ValueError, match="no crossbar layers"):
        xb.reprogram_report(nn.Sequential(nn.ReLU()))


def test_report_outputs(tmp_path):
    xm = xb.convert(small_cnn(), STUCK)
    rep = xb.reprogram_report(xm)
    d = rep.to_dict()
    for k in ("tiles", "pool", "initial_writes", "writes_per_pass", "set_writes_per_pass",
              "reset_writes_per_pass", "pulses_per_pass", "rows_programmed_per_pass",
              "baseline_writes_per_pass", "reduction", "per_slice", "layers",
              "max_cell_writes_per_pass", "config"):
        assert k in d
    import json
    rep.to_json(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(d))
    csv_text = rep.to_csv(tmp_path / "r.csv")
    assert csv_text.splitlines()[-1].startswith("TOTAL") and len(csv_text.splitlines()) == 5
    text = str(rep)
    assert "writes per pass" in text and "reduction" in text and "slice  0" in text


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(SAMPLE_DATA), reason="../shared/data not present")
def test_lite0_top1_agrees_with_float_at_16_and_8_bits():
    from crossbar_torch.apps.data import ImageNetFolder, transform_for
    from crossbar_torch.apps.models.efficientnet_lite import load_efficientnet_lite
    model = load_efficientnet_lite("tf_efficientnet_lite0")
    ds = ImageNetFolder(os.path.join(SAMPLE_DATA, "val"), transform_for(model))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        ref = torch.cat([model(b) for b in x.split(25)]).argmax(1)
        agree = {}
        for bits in (16, 8):
            xm = xb.convert(model, xb.CrossbarConfig(weight_bits=bits)).eval()
            got = torch.cat([xm(b) for b in x.split(25)]).argmax(1)
            agree[bits] = (got == ref).sum().item()
    assert agree[16] == len(ds)           # all 100 images
    assert agree[8] >= len(ds) - 3        # nearly all (measured: see README)


def test_report_refuses_a_config_other_than_the_layers():
    cfg = xb.CrossbarConfig(rows=8, cols=28)
    xm = xb.convert(small_cnn(), cfg)
    assert xb.reprogram_report(xm, cfg).writes_per_pass == xb.reprogram_report(xm).writes_per_pass
    with pytest.raises(ValueError, match="sort"):
        xb.reprogram_report(xm, cfg.replace(sort="none"))


def test_underflowing_scale_quantizes_to_zero():
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight[0] = 1e-44   # amax / 127 underflows to 0 in float32
        lin.weight[1] = torch.tensor([1.0, -0.5, 0.25])
    xm = xb.convert(nn.Sequential(lin), xb.CrossbarConfig(rows=8, cols=28))
    assert xm[0].scale[0].item() == 1.0
    assert xm[0].effective_q()[0].tolist() == [0, 0, 0]
    assert xm[0].effective_q()[1].tolist() == [127, -64, 32]


def test_loading_a_non_permutation_index_fails():
    xm = xb.convert(small_cnn(), xb.CrossbarConfig())
    sd = xm.state_dict()
    sd["0.sort_index"][0, 1] = sd["0.sort_index"][0, 0]
    with pytest.raises(RuntimeError, match="not a permutation"):
        xb.convert(small_cnn(), xb.CrossbarConfig()).load_state_dict(sd)


# ---- tampered buffers in a loaded state dict (issue 12, reliability) ------------------------

_OLD = {}


def _unpacked(t, level=None):
    """The packed 1-bit ``cells`` t as saved before packing (one level a byte, c = 14), kept
    in _OLD so the tamper case can edit it in place; ``level`` fills the last cell."""
    old = unpack_levels(t, 14, 1)
    if level is not None:
        old.view(-1)[-1] = level
    _OLD["t"] = old
    return old


def _tamper_cases():
    """(layer prefix, buffer, how to tamper with the saved tensor, expected message)."""
    return [
        # one level a byte (the format before packing): its levels are checked, then packed
        ("0.", "cells", lambda t: _unpacked(t).view(-1).__setitem__(5, 2) or None,
         r"'cells' holds level 2 .*\[0, 1\]"),
        ("4.", "cells", lambda t: _unpacked(t, level=200), "'cells' holds level 200"),
        # packed: 14 one-bit cells in 2 bytes, the top 2 bits of the second are never set
        ("4.", "cells", lambda t: t[..., 1].__setitem__((0, 0), 255), "'cells' is not a packing"),
        ("2.", "stuck", lambda t: torch.full((8, 36, 2), 255, dtype=torch.uint8),
         "'stuck' is not a packing"),
        ("0.", "cells", lambda t: t.to(torch.int64).add_(300), "'cells' must have dtype"),
        ("4.", "cells", lambda t: t[:, :-1], "'cells' must have shape"),
        ("0.", "scale", lambda t: t.__setitem__(1, float("nan")), "'scale' holds 1 NaN or Inf"),
        ("2.", "scale", lambda t: t.__setitem__(0, float("inf")), "'scale' holds 1 NaN or Inf"),
        ("4.", "scale", lambda t: t.__setitem__(3, -0.5), "'scale' holds 1 value.* <= 0"),
        ("0.", "scale", lambda t: t.zero_(), "'scale' holds 8 value.* <= 0"),
        ("0.", "scale", lambda t: t.to(torch.int64), "'scale' must have dtype"),
        ("2.", "stuck", lambda t: torch.zeros(3, dtype=torch.bool), "'stuck' must have shape"),
        ("2.", "stuck", lambda t: torch.zeros(8, 36, 3, dtype=torch.bool),
         "'stuck' must have shape"),
        ("4.", "stuck", lambda t: torch.zeros(0, dtype=torch.float32), "'stuck' must have dtype"),
        ("0.", "sort_index", lambda t: t.__setitem__((2, 3), t[2, 4].item()),
         "'sort_index' is not a permutation of each row: row 2"),
        ("4.", "sort_index", lambda t: t.float(), "'sort_index' must have dtype"),
        ("2.", "sort_index", lambda t: t.t(), "'sort_index' must have shape"),
        ("0.", "tile_order", lambda t: torch.zeros(t.numel(), dtype=torch.int64),
         "'tile_order' is not a permutation"),
        ("4.", "tile_order", lambda t: torch.arange(t.numel() + 1), "'tile_order' must have shape"),
        ("2.", "tile_order", lambda t: t.float(), "'tile_order' must have dtype"),
    ]


@pytest.mark.parametrize("i", range(len(_tamper_cases())))
def test_tampered_buffers_are_refused_naming_layer_and_buffer(i):
    prefix, name, tamper, match = _tamper_cases()[i]
    cfg = xb.CrossbarConfig(rows=16, cols=32)
    xm = xb.convert(small_cnn(), cfg)
    sd = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in xm.state_dict().items()}
    t = sd[prefix + name]
    _OLD.clear()
    changed = tamper(t)
    sd[prefix + name] = (changed if isinstance(changed, torch.Tensor)
                         else _OLD.get("t", t))
    fresh = xb.convert(small_cnn(), cfg)
    before = {k: v.clone() for k, v in fresh.state_dict().items() if isinstance(v, torch.Tensor)}
    layer = prefix.rstrip(".")
    with pytest.raises(RuntimeError, match=f"crossbar layer {layer}: buffer {match}"):
        fresh.load_state_dict(sd)
    # refused before anything of that layer was copied
    after = fresh.state_dict()
    for k in before:
        if k.startswith(prefix):
            assert torch.equal(before[k], after[k]), k


def test_tampered_buffers_are_named_in_a_nested_model():
    cfg = xb.CrossbarConfig(rows=16, cols=32)
    xm = xb.convert(nn.Sequential(nn.Sequential(small_cnn())), cfg)
    sd = xm.state_dict()
    sd["0.0.2.cells"] = torch.full((*sd["0.0.2.cells"].shape[:2], 14), 3, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"crossbar layer 0\.0\.2: buffer 'cells' holds level 3"):
        xb.convert(nn.Sequential(nn.Sequential(small_cnn())), cfg).load_state_dict(sd)


def test_untampered_state_dict_with_stuck_cells_and_tile_order_loads():
    xm = xb.convert(small_cnn(), STUCK)
    sd = xm.state_dict()
    assert sd["0.stuck"].numel() and sd["0.tile_order"].numel()
    fresh = xb.convert(small_cnn(), STUCK)
    fresh.load_state_dict(sd)
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(fresh.state_dict()[k], v), k
