"""The analog periphery in the layers (docs/semantics.md rules 17 to 20): DAC, ADC, noise,
drift, calibration, the straight-through estimator, held to independent computations."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crossbar_torch as xb
from crossbar_torch.nn import analog
from independent import simulate
from test_programming import small_model, weight_matrices


def conv_model(seed=0):
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, groups=4, padding="same", bias=False), nn.Tanh(),
                      nn.Conv2d(8, 6, 2, stride=2, dilation=1), nn.Flatten(),
                      nn.Linear(6 * 4 * 4, 10))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m.eval()


def inputs(seed=1, shape=(3, 3, 9, 9)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


BASE = dict(rows=16, cols=28, sort="value")


def layer_inputs(model, x):
    """The input each crossbar layer receives, in order (forward hooks)."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
             for _, m in xb.crossbar_layers(model)]
    model(x)
    for h in hooks:
        h.remove()
    return seen


def dac_reference(layer, x, bits, r):
    """Rule 17 + 18 without an ADC, by hand: y = s_x * scale * (q_eff . xq) in float64."""
    s_x = float(torch.tensor(r, dtype=torch.float32) / (2 ** bits - 1))
    top = 2 ** bits - 1
    q = layer.effective_q().to(torch.float64)
    scale = layer.scale.to(torch.float64)
    if isinstance(layer, xb.CrossbarLinear):
        xq = torch.clamp(torch.round(x.float() / torch.tensor(s_x, dtype=torch.float32)),
                         -top, top).to(torch.float64)
        acc = xq @ q.T
        return (acc * (s_x * scale)).float() + layer.bias.detach()
    # a convolution as im2col rows, each filter reading its group's columns (not F.conv2d)
    xin, pad = x, layer.padding
    if pad == "same":
        xin, pad = F.pad(x, [1, 1, 1, 1]), (0, 0)   # the 3x3 'same' layer of conv_model
    B = xin.shape[0]
    cols = F.unfold(xin, layer.kernel_size, layer.dilation, pad, layer.stride)
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    xq = torch.clamp(torch.round(rows.float() / torch.tensor(s_x, dtype=torch.float32)),
                     -top, top).to(torch.float64)
    g, out, K = layer.groups, q.shape[0], q.shape[1]
    acc = torch.einsum("ngk,gpk->ngp", xq.view(-1, g, K), q.view(g, out // g, K)).reshape(-1, out)
    y = (acc * (s_x * scale)).float()
    Ho = (xin.shape[2] + 2 * pad[0] - layer.dilation[0] * (layer.kernel_size[0] - 1) - 1) \
        // layer.stride[0] + 1
    y = y.reshape(B, Ho, -1, out).permute(0, 3, 1, 2)
    return y if layer.bias is None else y + layer.bias.detach().view(1, -1, 1, 1)


@pytest.mark.parametrize("bits", [1, 4, 8])
def test_dac_without_adc_is_the_quantized_input_product(bits):
    m = conv_model()
    x = inputs()
    xm = xb.convert(m, xb.CrossbarConfig(**BASE, input_bits=bits, input_range=2.5))
    for (name, layer), xin in zip(xb.crossbar_layers(xm), layer_inputs(xm, x)):
        got = layer(xin)
        want = dac_reference(layer, xin, bits, 2.5)
        assert torch.equal(got, want), name


def test_ideal_config_is_the_cached_gemm_bit_for_bit():
    m, x = conv_model(), inputs()
    cfg = xb.CrossbarConfig(**BASE)
    assert not cfg.analog
    xm = xb.convert(m, cfg)
    for (name, layer), xin in zip(xb.crossbar_layers(xm), layer_inputs(xm, x)):
        if isinstance(layer, xb.CrossbarLinear):
            want = F.linear(xin, layer.effective_weight(), layer.bias)
        else:
            want = F.conv2d(xin, layer.effective_weight(), layer.bias, layer.stride,
                            layer.padding, layer.dilation, layer.groups)
        assert torch.equal(layer(xin), want), name


def test_finite_g_ratio_alone_changes_nothing_but_rounding():
    """The offset g0 is subtracted digitally (rule 18): without noise and converters the
    result is the ideal one up to float rounding."""
    m, x = conv_model(), inputs()
    y0 = xb.convert(m, xb.CrossbarConfig(**BASE))(x)
    y = xb.convert(m, xb.CrossbarConfig(**BASE, g_ratio=30))(x)
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [
    dict(prog_noise=0.05, drift_nu=0.03, drift_nu_std=0.01, t_inference=100.0),
    dict(prog_noise=0.02, stuck_slices=2, reprogram_fraction=0.3, pool=2, filter_order="profile",
         schedule="greedy", compensate=True),
    dict(prog_noise=0.1, pool=3, stuck_value=1, stuck_slices=1, reprogram_fraction=0.5),
    # many tiles a crossbar, several cells a weight, two levels a cell (the vectorized replay)
    dict(prog_noise=0.03, rows=5, pool=4, bits_per_cell=2, encoding="offset",
         filter_order="chain"),
])
def test_programming_noise_and_drift_match_the_independent_replay(cfg):
    """Rule 19: each cell's eps_p is the draw of its physical cell's last write (pass 1 if
    written in pass 1 at or before its tile, else pass 0, else none); nu per physical cell."""
    cfg = xb.CrossbarConfig(**{**BASE, **cfg})
    model = small_model(7)
    xm = xb.convert(model, cfg)
    sim = simulate(weight_matrices(model), cfg.to_dict())
    for name, layer in xb.crossbar_layers(xm):
        out, K, c = layer.held_cells().shape
        eps = torch.zeros(out, K, c, dtype=torch.float32)
        nu = torch.zeros(out, K, c, dtype=torch.float32)
        for (lname, o, k, i), (e, n) in sim["cell_noise"].items():
            if lname == name:
                kp = int((layer.sort_index[o] == k).nonzero())
                eps[o, kp, i], nu[o, kp, i] = e, n
        assert torch.equal(layer.prog_eps, eps), name
        if cfg.drift_nu or cfg.drift_nu_std:
            assert torch.equal(layer.drift_nu, nu), name
        else:
            assert layer.drift_nu.numel() == 0
    # fewer writes, fewer fresh errors: cells never written carry none
    assert any((l.prog_eps == 0).any() for _, l in xb.crossbar_layers(xm))


def test_noise_is_reproducible_and_read_noise_is_fresh_every_forward():
    m, x = conv_model(), inputs()
    cfg = xb.CrossbarConfig(**BASE, prog_noise=0.03, read_noise=0.02)
    a, b = xb.convert(m, cfg), xb.convert(m, cfg)
    ya1, yb1 = a(x), b(x)
    assert torch.equal(ya1, yb1)               # same seed, same draws
    ya2 = a(x)
    assert not torch.equal(ya1, ya2)           # a new read-noise draw
    assert torch.equal(ya2, b(x))              # ... the same one in both models
    c = xb.convert(m, cfg.replace(seed=1))
    assert not torch.equal(c(x), ya1)


def test_conductance_formula_by_hand():
    cfg = xb.CrossbarConfig(**BASE, bits_per_cell=2, g_ratio=7.0, prog_noise=0.1, drift_nu=0.05,
                            drift_nu_std=0.02, t_inference=50.0)
    xm = xb.convert(small_model(1), cfg)
    layer = xb.crossbar_layers(xm)[0][1]
    g = analog.conductances(layer, read=False)
    g0 = 3 / 6
    want = ((layer.held_cells().double() + g0) * (1 + 0.1 * layer.prog_eps.double())
            * 50.0 ** (-layer.drift_nu.double())).clamp(min=0).permute(0, 2, 1)
    torch.testing.assert_close(g.double(), want, rtol=1e-6, atol=1e-6)


def test_cell_weights_decode_every_linear_encoding():
    for enc, b in (("differential", 1), ("differential", 3), ("offset", 2),
                   ("twos_complement", 1), ("twos_complement", 7)):
        cfg = xb.CrossbarConfig(weight_bits=8, bits_per_cell=b, encoding=enc)
        q = torch.arange(-127, 128, dtype=torch.int32)[:, None]
        cells = xb.ops.encode(q, 8, b, cfg.encoding_id)
        w, offset = analog.cell_weights(cfg)
        got = (cells.double() * w).sum(-1) - offset
        assert torch.equal(got, q.double()), (enc, b)
    with pytest.raises(ValueError, match="encoding"):
        xb.CrossbarConfig(encoding="twos_complement", bits_per_cell=2, input_bits=8)


def test_calibrate_sets_input_ranges_in_model_order_and_refuses_bad_batches():
    m, x = conv_model(), inputs()
    xm = xb.convert(m, xb.CrossbarConfig(**BASE, input_bits=8))
    with pytest.raises(RuntimeError, match="calibrat"):
        xm(x)
    ranges = xb.calibrate(xm, x)
    # each layer's range is max |input| of what it receives in the calibrated model
    for (name, layer), xin in zip(xb.crossbar_layers(xm), layer_inputs(xm, x)):
        assert ranges[name]["input_range"] == [pytest.approx(float(xin.abs().max()))]
    y = xm(x)
    assert torch.isfinite(y).all()
    with pytest.raises(ValueError, match="empty"):
        xb.calibrate(xm, x[:0])
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        xb.calibrate(xm, bad)


def test_a_failed_calibration_keeps_the_previous_ranges():
    """Issue 20 defect 6: a wrong-shaped batch or a DataLoader batch [images, labels] used to
    wipe every range, so every later forward raised CalibrationNeeded."""
    m, x = conv_model(), inputs()
    xm = xb.convert(m, xb.CrossbarConfig(**BASE, input_bits=8, adc_bits=6,
                                         adc_range="calibrated"))
    before = xb.calibrate(xm, x)
    y = xm(x)
    with pytest.raises(RuntimeError):
        xb.calibrate(xm, torch.randn(2, 5, 9, 9))  # 5 channels: the first conv refuses it
    with pytest.raises(TypeError, match=r"pass batch\[0\]"):
        xb.calibrate(xm, [x, torch.zeros(3, dtype=torch.long)])
    with pytest.raises(TypeError, match=r"pass batch\[0\]"):
        xb.calibrate(xm, (x, torch.zeros(3, dtype=torch.long)))
    after = {name: {"input_range": l.input_range.tolist(), "adc_range": l.adc_range.tolist()}
             for name, l in xb.crossbar_layers(xm)}
    assert after == before
    assert torch.equal(xm(x), y)


def test_ranges_round_trip_through_the_state_dict():
    m, x = conv_model(), inputs()
    cfg = xb.CrossbarConfig(**BASE, input_bits=6, prog_noise=0.02)
    xm = xb.convert(m, cfg)
    xb.calibrate(xm, x)
    other = xb.convert(m, cfg)  # not calibrated
    with torch.no_grad():
        for _, layer in xb.crossbar_layers(other):
            layer.prog_eps.zero_()  # ... and its noise draws lost: the state dict restores them
    other.load_state_dict(xm.state_dict())
    assert torch.equal(other(x), xm(x))


def test_old_state_dicts_without_analog_buffers_still_load():
    m = conv_model()
    xm = xb.convert(m, xb.CrossbarConfig(**BASE))
    sd = {k: v for k, v in xm.state_dict().items()
          if not k.endswith(("input_range", "adc_range", "prog_eps", "drift_nu"))}
    fresh = xb.convert(m, xb.CrossbarConfig(**BASE))
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh(inputs()), xm(inputs()), rtol=0, atol=0)


def test_training_is_straight_through_the_ideal_path():
    """Train mode: the value is the analog output, the gradient the ideal path's (rule 20)."""
    torch.manual_seed(0)
    lin = nn.Linear(20, 5)
    x = torch.randn(7, 20, requires_grad=True)
    cfg = xb.CrossbarConfig(**BASE, input_bits=3, input_range=2.0, prog_noise=0.05)
    a = xb.convert(lin, cfg).train()
    ideal = xb.convert(lin, xb.CrossbarConfig(**BASE)).train()
    ya = a(x)
    ya.square().sum().backward()
    ga_x, ga_w = x.grad.clone(), a.weight.grad.clone()
    with torch.no_grad():
        a.eval()
        assert torch.equal(ya.detach(), a(x))  # train and eval compute the same numbers
        a.train()
    x.grad = None
    yi = ideal(x)
    (yi * (2 * ya.detach())).sum().backward()  # the same upstream gradient 2*ya
    torch.testing.assert_close(ga_x, x.grad)
    torch.testing.assert_close(ga_w, ideal.weight.grad)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bits=st.integers(1, 10), per_cycle=st.integers(1, 4), seed=st.integers(0, 100),
       enc=st.sampled_from(["differential", "offset"]), b=st.integers(1, 3))
def test_dac_property_linear(bits, per_cycle, seed, enc, b):
    """Without an ADC the bit-serial cycles add up to the plain quantized product."""
    per_cycle = min(per_cycle, bits)
    torch.manual_seed(seed)
    lin = nn.Linear(33, 9)
    cfg = xb.CrossbarConfig(**BASE, encoding=enc, bits_per_cell=b, input_bits=bits,
                            input_bits_per_cycle=per_cycle, input_range=1.5)
    layer = xb.convert(lin, cfg)
    x = torch.randn(5, 33)
    assert torch.equal(layer(x), dac_reference(layer, x, bits, 1.5))


def test_bad_analog_fields_name_themselves():
    for kw, field in ((dict(input_bits=0), "input_bits"), (dict(adc_bits=25), "adc_bits"),
                      (dict(input_range=-1.0), "input_range"), (dict(g_ratio=0.5), "g_ratio"),
                      (dict(prog_noise=float("nan")), "prog_noise"),
                      (dict(read_noise=-0.1), "read_noise"), (dict(drift_nu=-1), "drift_nu"),
                      (dict(t_inference=0.0), "t_inference"), (dict(adc_range="auto"), "adc_range"),
                      (dict(adc_scope="tile"), "adc_scope"),
                      (dict(prog_noise=0.1, wear_leveling="rotate"), "wear_leveling")):
        with pytest.raises(ValueError, match=field):
            xb.CrossbarConfig(**kw)
    assert math.isclose(xb.CrossbarConfig(g_ratio=11.0).g0, 0.1)
    assert xb.CrossbarConfig(g_ratio="inf").g_ratio is None
    np.testing.assert_equal(xb.CrossbarConfig().analog, False)


# ---- the ADC (rule 18) ------------------------------------------------------------------------

def naive_linear(layer, x, cfg, adc_ranges=None):
    """Rule 17 + 18 for a Linear layer with plain Python loops, from the rules (no torch ops on
    the layer, no reference op): returns y (N, out) float32 and the largest P of each slice."""
    K = layer.in_features
    cells = layer.held_cells().tolist()
    sidx = layer.sort_index.tolist()
    scale = layer.scale.double().tolist()
    S, b, c = cfg.slices, cfg.bits_per_cell, cfg.cells_per_weight
    w_i = [2.0 ** (b * (i % S)) * (-1 if i >= S else 1) for i in range(c)]  # differential
    I, d = cfg.input_bits, cfg.input_bits_per_cycle
    r = cfg.input_range
    s_x = float(torch.tensor(r, dtype=torch.float32) / (2 ** I - 1))
    xq = torch.clamp(torch.round(x.float() / torch.tensor(s_x, dtype=torch.float32)),
                     -(2 ** I - 1), 2 ** I - 1).to(torch.int64).tolist()

    def step(R):
        e = 0
        while 2 ** e <= R:
            e += 1
        return 2.0 ** (e - cfg.adc_bits)

    full = cfg.rows * (2 ** b - 1) * (2 ** d - 1)
    pmax = [0.0] * S
    ys = []
    for n in range(len(xq)):
        row = []
        for o in range(layer.out_features):
            acc = 0.0
            for s0 in range(0, K, cfg.rows):
                ks = range(s0, min(K, s0 + cfg.rows))
                for sign in (1, -1):
                    for j in range(-(-I // d)):
                        dig = [((max(sign * xq[n][sidx[o][k]], 0)) >> (d * j)) & (2 ** d - 1)
                               for k in ks]
                        for i in range(c):
                            P = float(sum(cells[o][k][i] * dg for k, dg in zip(ks, dig)))
                            pmax[i % S] = max(pmax[i % S], P)
                            R = full if adc_ranges is None else adc_ranges[i % S]
                            st = step(R)
                            code = min(max(round(P / st), 0), 2 ** cfg.adc_bits - 1)
                            acc += sign * 2.0 ** (d * j) * w_i[i] * code * st
            row.append(acc * (s_x * scale[o]))
        ys.append(row)
    y = torch.tensor(ys, dtype=torch.float64).float() + layer.bias.detach()
    return y, pmax


@pytest.mark.parametrize("adc_bits,per_cycle,adc_range", [(3, 1, "full"), (5, 2, "full"),
                                                         (2, 1, "calibrated"),
                                                         (4, 3, "calibrated")])
def test_adc_layer_output_matches_naive_loops(adc_bits, per_cycle, adc_range):
    torch.manual_seed(3)
    lin = nn.Linear(11, 4)
    cfg = xb.CrossbarConfig(rows=4, cols=28, sort="value", input_bits=5,
                            input_bits_per_cycle=per_cycle, input_range=2.0, adc_bits=adc_bits,
                            adc_range=adc_range)
    layer = xb.convert(lin, cfg).eval()
    x = torch.randn(3, 11)
    ranges = None
    if adc_range == "calibrated":
        got_ranges = xb.calibrate(layer, x)[""]["adc_range"]
        _, ranges = naive_linear(layer, x, cfg.replace(adc_bits=24))
        assert got_ranges == ranges                       # max P per slice, both arrays
    y, _ = naive_linear(layer, x, cfg, ranges)
    assert torch.equal(layer(x), y)


@pytest.mark.parametrize("scope_bits", [("slice", 16), ("weight", 24)])
def test_lossless_adc_equals_the_path_without_adc(scope_bits):
    scope, bits = scope_bits
    m, x = conv_model(), inputs()
    cfg = xb.CrossbarConfig(**BASE, input_bits=7)
    plain = xb.convert(m, cfg)
    xb.calibrate(plain, x)
    lossless = xb.convert(m, cfg.replace(adc_bits=bits, adc_scope=scope))
    xb.calibrate(lossless, x)
    assert torch.equal(lossless(x), plain(x))
    coarse = xb.convert(m, cfg.replace(adc_bits=3, adc_scope=scope))
    xb.calibrate(coarse, x)
    assert not torch.equal(coarse(x), plain(x))


@pytest.mark.parametrize("sort,groups", [("none", 4), ("value", 4), ("none", 1),
                                         ("value", 1)])
def test_weight_scope_gemms_equal_the_reference_op(sort, groups):
    """adc_scope='weight' computes its partial sums with GEMMs (one per section; for an
    ungrouped unsorted convolution, one convolution per section over its channels); the
    plain-PyTorch reference of the fused op (signed_weights) gives the same numbers."""
    from crossbar_torch.ops import analog_reference as ar
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, groups=groups)
    cfg = xb.CrossbarConfig(rows=7, cols=28, sort=sort, input_bits=6, input_range=2.0,
                            adc_bits=5, adc_scope="weight")
    layer = xb.convert(conv, cfg).eval()
    x = torch.randn(2, 8, 6, 6)
    rows = F.unfold(x, 3).transpose(1, 2).reshape(-1, 72)
    s_x = analog.input_scale(layer, x)
    q_sorted = xb.ops.decode(layer.held_cells(), 8, 1, 0).float()[:, None, :]
    step = analog.adc_steps(layer)
    acc, _ = ar.analog_matmul(rows, q_sorted, layer.sort_index, torch.ones(1, dtype=torch.float64),
                              step, groups, 7, 6, 1, s_x, 5, 0.0, 0.0, True)
    want = (acc * (s_x * layer.scale.double())).float().reshape(2, 16, 12).permute(0, 2, 1)
    want = want.reshape(2, 12, 4, 4) + layer.bias.detach().view(1, -1, 1, 1)
    assert torch.equal(layer(x), want)


def test_uncalibrated_adc_range_is_a_clear_error():
    m, x = conv_model(), inputs()
    xm = xb.convert(m, xb.CrossbarConfig(**BASE, input_bits=8, input_range=3.0, adc_bits=6,
                                         adc_range="calibrated"))
    with pytest.raises(RuntimeError, match="calibrated ADC range"):
        xm(x)
    xb.calibrate(xm, x)
    assert torch.isfinite(xm(x)).all()


def test_torch_compile_of_an_analog_model_equals_eager():
    m, x = conv_model(), inputs()
    xm = xb.convert(m, xb.CrossbarConfig(**BASE, input_bits=6, input_range=3.0, adc_bits=6))
    eager = xm(x)
    compiled = torch.compile(xm, backend="eager")
    assert torch.equal(compiled(x), eager)


@pytest.mark.parametrize("backend, train", [  # tracing is slow: one fast case
    ("eager", True), pytest.param("eager", False, marks=pytest.mark.slow),
    pytest.param("aot_eager", True, marks=pytest.mark.slow)])
def test_torch_compile_with_read_noise_equals_eager(backend, train):
    """Issue 20 defect 5: read_noise > 0 failed under torch.compile (KeyError(torch.uint64) in
    the numpy seed of the draw); the draw now runs eagerly, so every forward draws anew, the
    same noise as eager, forward and backward."""
    import copy
    m, x = conv_model(), inputs()
    xm = xb.convert(m, xb.CrossbarConfig(**BASE, input_bits=6, input_range=3.0,
                                         read_noise=0.05)).train(train)
    twin = copy.deepcopy(xm)
    compiled = torch.compile(twin, backend=backend)
    for _ in range(2):  # fresh draws each forward, the same in both
        xe, xc = x.clone().requires_grad_(train), x.clone().requires_grad_(train)
        ye, yc = xm(xe), compiled(xc)
        assert torch.equal(yc, ye)
        if train:
            ye.square().sum().backward()
            yc.square().sum().backward()
            # the same noise, so the same gradients up to the order of float sums (aot_eager's
            # decomposed backward adds a bias gradient in another order)
            torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-5)
            for (n, p), (_, q) in zip(xm.named_parameters(), twin.named_parameters()):
                assert p.grad is not None, n
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-4, msg=n)
    assert [l._forward_count for _, l in xb.crossbar_layers(twin)] == \
        [l._forward_count for _, l in xb.crossbar_layers(xm)] == [2] * 4


def test_programming_noise_costs_little_more_than_converting():
    """Issue 20 defect 24: replaying the writes for the programming noise tile by tile in
    Python made conversion ~11x slower (~100x here, one thread, with ~4k small tiles); the
    vectorized replay (analog._replay_layer) costs about 1.5 conversions more. The numbers are
    those of the tile-by-tile replay (test_programming_noise_and_drift_match_...)."""
    import time
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(16, 64, 3), nn.Conv2d(64, 64, 3), nn.Flatten(),
                      nn.Linear(64, 100)).eval()
    base = dict(rows=8, cols=28, sort="value", input_bits=8)  # 2 filters a crossbar: ~4k tiles

    cfgs = (xb.CrossbarConfig(**base), xb.CrossbarConfig(**base, prog_noise=0.05))
    times = ([], [])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # intra-op threads on a loaded machine time the load, not the code
    try:
        for _ in range(5):  # interleaved, best of 5: the machine's load hits both alike
            for cfg, ts in zip(cfgs, times):
                t = time.perf_counter()
                xb.convert(m, cfg)
                ts.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    plain, noisy = min(times[0]), min(times[1])
    assert noisy < 6 * plain, (plain, noisy)  # vectorized: ~2.5x; tile by tile: ~100x
