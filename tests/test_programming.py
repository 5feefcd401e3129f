"""Rules 5 to 13 (docs/semantics.md) held against tests/independent.py (a naive, separately
written simulator) and against cases worked out by hand."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crossbar_torch as xb
from conftest import DEVICES
from independent import simulate

COUNT_KEYS = ["tiles", "initial_writes", "writes_per_pass", "set_writes_per_pass",
              "reset_writes_per_pass", "pulses_per_pass", "set_pulses_per_pass",
              "rows_programmed_per_pass", "max_cell_writes_per_pass"]


def wear_from_cells(cells: dict, period: int) -> dict:
    """Rule 15 computed from the simulator's per-cell period totals {(x, r, col): writes}."""
    worn = sorted((v for v in cells.values() if v > 0), reverse=True)
    n = len(worn)
    if not n:
        return {"worn_cells": 0, "max": 0, "p99": 0, "p50": 0, "mean": 0}
    return {"worn_cells": n, "max": worn[0] / period, "p99": worn[-(-n // 100) - 1] / period,
            "p50": worn[-(-n // 2) - 1] / period, "mean": sum(worn) / period / n}


def assert_wear_matches(rep, sim, cfg):
    """The per-cell statistics of rule 15, whole pool, per crossbar and per layer."""
    T = sim["period"]
    assert rep["period_passes"] == T
    want = wear_from_cells(sim["cell_period_writes"], T)
    got = rep["cell_writes_per_pass"]
    for k in ("worn_cells", "max", "p99", "p50"):
        assert got[k] == want[k], k
    assert got["mean"] == pytest.approx(want["mean"], rel=1e-12)
    assert got["cells"] == cfg.pool * cfg.rows * cfg.cols
    assert sum(got["histogram"]["counts"]) == want["worn_cells"]
    per_x = [max([v for (x, _, _), v in sim["cell_period_writes"].items() if x == xi] + [0]) / T
             for xi in range(cfg.pool)]
    assert rep["crossbar_max_cell_writes_per_pass"] == per_x
    for l in rep["layers"]:
        lw = wear_from_cells(sim["layer_cell_period_writes"].get(l["name"], {}), T)
        assert l["max_cell_writes_per_pass"] == lw["max"], l["name"]
        assert l["p99_cell_writes_per_pass"] == lw["p99"], l["name"]
        assert l["worn_cells"] == lw["worn_cells"], l["name"]


def weight_matrices(model):
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            out.append((name, m.weight.detach().cpu().flatten(1).numpy()))
    return out


def assert_matches_simulator(model, cfg, device="cpu"):
    xm = xb.convert(model.to(device), cfg)
    rep = xb.reprogram_report(xm).to_dict()
    sim = simulate(weight_matrices(model), cfg.to_dict())
    assert [l["tile_order"] for l in rep["layers"]] == sim["orders"]
    for (name, layer), order in zip(xb.crossbar_layers(xm), sim["orders"]):
        assert layer.tile_order.cpu().tolist() == order, name
    for k in COUNT_KEYS:
        assert rep[k] == sim[k], k
    assert [rep["per_slice"][str(i)] for i in range(cfg.slices)] == sim["per_slice"]
    assert [(l["name"], l["writes_per_pass"]) for l in rep["layers"]] == sim["layers"]
    assert_wear_matches(rep, sim, cfg)
    for (name, layer), q_eff, s in zip(xb.crossbar_layers(xm), sim["q_eff"], sim["scales"]):
        got, want = layer.effective_q().cpu(), torch.tensor(q_eff, dtype=torch.int32)
        if want.numel() == 0:  # the simulator's lists lose the shape of an empty matrix
            want = want.reshape(got.shape)
        assert torch.equal(got, want), name
        assert torch.equal(layer.scale.cpu(), torch.tensor(np.array(s, dtype=np.float32)))
    base = simulate(weight_matrices(model), cfg.baseline().to_dict())
    assert rep["baseline_writes_per_pass"] == base["writes_per_pass"]
    if sim["writes_per_pass"]:
        assert rep["reduction"] == pytest.approx(base["writes_per_pass"] / sim["writes_per_pass"])
    return xm, rep


def small_model(seed, conv=True):
    g = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(19, 13), nn.Linear(13, 7, bias=False)]
    if conv:
        layers = [nn.Conv2d(4, 6, 3, groups=2), nn.Conv2d(6, 5, 1)] + layers
    m = nn.Sequential(*layers)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        m[-1].weight[0, :3] = 0.0   # ties for the stable sort
    return m


configs = st.builds(
    dict,
    rows=st.integers(1, 12), cols_extra=st.integers(0, 70),
    weight_bits=st.integers(2, 9), bits_per_cell=st.integers(1, 4),
    encoding=st.sampled_from(["differential", "twos_complement", "offset"]),
    sort=st.sampled_from(["none", "magnitude", "value"]),
    quant=st.sampled_from(["per_channel", "per_tensor"]),
    stuck_slices=st.integers(0, 8), reprogram_fraction=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
    stuck_value=st.sampled_from(["initial", 0, 1]), pool=st.integers(1, 5),
    seed=st.integers(0, 2 ** 31))


def make_config(d):
    d = dict(d)
    enc, B = d["encoding"], d["weight_bits"]
    mag = B - 1 if enc == "differential" else B
    d["bits_per_cell"] = min(d["bits_per_cell"], mag)
    probe = xb.CrossbarConfig(encoding=enc, weight_bits=B, bits_per_cell=d["bits_per_cell"],
                              cols=64)
    d["cols"] = probe.cells_per_weight + d.pop("cols_extra")
    d["stuck_slices"] = min(d["stuck_slices"], probe.slices)
    return xb.CrossbarConfig(**d)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs, seed=st.integers(0, 1000))
def test_counts_and_effective_weights_match_independent_simulator(cfg, seed):
    assert_matches_simulator(small_model(seed), make_config(cfg))


# Rules 11 to 13 on top of everything above: placement, greedy windows (smaller and larger
# than a layer's tile count), pools, compensation for every encoding and bits per cell.
mapping_configs = st.builds(
    dict, base=configs,
    filter_order=st.sampled_from(["natural", "profile", "chain"]),
    schedule=st.sampled_from(["section_major", "greedy"]),
    schedule_window=st.sampled_from([1, 2, 3, 5, 256]),
    compensate=st.booleans())


def make_mapping_config(d):
    cfg = make_config(d["base"])
    extra = {k: v for k, v in d.items() if k != "base"}
    if extra["compensate"] and cfg.compensation_bits > 12:   # keep the naive search small
        cfg = cfg.replace(stuck_slices=max(0, 12 // (cfg.bits_per_cell * cfg.cells_per_weight
                                                     // cfg.slices)))
    return cfg.replace(**extra)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=mapping_configs, seed=st.integers(0, 1000))
def test_placement_order_and_compensation_match_independent_simulator(cfg, seed):
    assert_matches_simulator(small_model(seed), make_mapping_config(cfg))


# Rule 14 on top of rules 1 to 12: the mapping shifts every pass; counted over a period.
wear_configs = st.builds(
    dict, base=configs, wear_leveling=st.sampled_from(["rotate_rows", "rotate"]),
    filter_order=st.sampled_from(["natural", "profile"]),
    schedule=st.sampled_from(["section_major", "greedy"]), rows=st.integers(1, 6))


def make_wear_config(d):
    cfg = make_config(d["base"]).replace(stuck_slices=0, rows=d["rows"])
    if d["wear_leveling"] == "rotate" and math.lcm(cfg.rows, cfg.cols) > 48:
        # keep the naive simulator's period short: cols a multiple of rows
        cfg = cfg.replace(cols=cfg.rows * -(-cfg.cells_per_weight // cfg.rows))
    return cfg.replace(wear_leveling=d["wear_leveling"], filter_order=d["filter_order"],
                       schedule=d["schedule"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=wear_configs, seed=st.integers(0, 1000))
def test_wear_leveling_matches_independent_simulator(cfg, seed):
    cfg = make_wear_config(cfg)
    xm, rep = assert_matches_simulator(small_model(seed, conv=seed % 2 == 0), cfg)
    # the baseline never rotates, and the effective weights do not depend on the offset
    plain = xb.convert(small_model(seed, conv=seed % 2 == 0), cfg.replace(wear_leveling="none"))
    for (_, a), (_, b) in zip(xb.crossbar_layers(xm), xb.crossbar_layers(plain)):
        assert torch.equal(a.effective_q(), b.effective_q())
    assert rep["baseline_writes_per_pass"] == xb.reprogram_report(plain).to_dict()[
        "baseline_writes_per_pass"]


def test_rotation_spreads_the_hot_first_row():
    """Rows past a layer's K are never written without rotation; rotate_rows reaches every row
    and lowers the hottest cell, with the same average writes (up to the pass boundaries)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 30), nn.Linear(30, 30), nn.Linear(30, 3))
    cfg = xb.CrossbarConfig(rows=32, cols=30, sort="value")  # rows 30, 31, cols 28, 29 unused
    reps = {wl: xb.reprogram_report(xb.convert(model, cfg.replace(wear_leveling=wl)),
                                    reuse=False).to_dict()
            for wl in ("none", "rotate_rows", "rotate")}
    none, rows, both = reps["none"], reps["rotate_rows"], reps["rotate"]
    assert rows["period_passes"] == 32 and both["period_passes"] == 480
    assert none["cell_writes_per_pass"]["worn_cells"] <= 30 * 28
    assert rows["cell_writes_per_pass"]["worn_cells"] == 32 * 28
    assert both["cell_writes_per_pass"]["worn_cells"] == 32 * 30
    assert rows["max_cell_writes_per_pass"] < none["max_cell_writes_per_pass"]
    assert both["max_cell_writes_per_pass"] < none["max_cell_writes_per_pass"]
    for r in (rows, both):
        assert r["writes_per_pass"] == pytest.approx(none["writes_per_pass"], rel=0.05)
        assert r["lifetime_gain"] > none["lifetime_gain"]


def test_wear_leveling_refuses_stucking():
    with pytest.raises(ValueError, match="wear_leveling"):
        xb.CrossbarConfig(stuck_slices=2, reprogram_fraction=0.5, wear_leveling="rotate_rows")
    with pytest.raises(ValueError, match="wear_leveling"):
        xb.CrossbarConfig(wear_leveling="diagonal")
    # p = 1 is no stucking: allowed
    xb.CrossbarConfig(stuck_slices=2, reprogram_fraction=1.0, wear_leveling="rotate")


def test_counting_fields_may_differ_from_the_layers():
    model = small_model(1)
    cfg = xb.CrossbarConfig(rows=6, cols=28, sort="value")
    xm = xb.convert(model, cfg)
    rep = xb.reprogram_report(xm, cfg.replace(wear_leveling="rotate_rows", device="pcm"))
    d = rep.to_dict()
    assert d["period_passes"] == 6 and d["device"]["name"] == "pcm"
    assert d["config"]["wear_leveling"] == "rotate_rows"
    with pytest.raises(ValueError, match="sort"):
        xb.reprogram_report(xm, cfg.replace(sort="magnitude"))


@pytest.mark.parametrize("enc", ["differential", "twos_complement", "offset"])
@pytest.mark.parametrize("bits_per_cell", [1, 2, 3])
def test_compensation_with_every_stuck_value_matches_simulator(enc, bits_per_cell):
    for stuck_value in ("initial", 0, 1):
        cfg = xb.CrossbarConfig(rows=5, cols=40, encoding=enc, weight_bits=7,
                                bits_per_cell=bits_per_cell, stuck_slices=2,
                                reprogram_fraction=0.4, stuck_value=stuck_value, pool=2,
                                seed=11, sort="value", filter_order="profile",
                                schedule="greedy", schedule_window=3, compensate=True)
        assert_matches_simulator(small_model(5), cfg)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("enc", ["differential", "twos_complement", "offset"])
def test_paper_scale_configs_match_simulator(enc, device):
    cfg = xb.CrossbarConfig(rows=16, cols=64, encoding=enc, stuck_slices=3,
                            reprogram_fraction=0.25, pool=2, seed=7)
    assert_matches_simulator(small_model(3), cfg, device)


# ---- hand-checked two-tile layer ---------------------------------------------------------
# Linear(2 -> 1), w = [3, -1], 3-bit weights (qmax 3, s = 1, q = [3, -1]), 1-row crossbars:
# two sections of one weight, two tiles on one crossbar, sort none, 1 bit per cell.
#  differential (c = 4, S = 2): 3 -> [1,1 | 0,0], -1 -> [0,0 | 1,0]
#     pass 1: tile0 2 writes (set), tile1 3 writes (1 set, 2 resets)        initial = 5
#     pass 2: tile0 3 (2 set, 1 reset), tile1 3 (1 set, 2 reset)         per pass = 6
#     slices: columns 0 and 2 are slice 0, 1 and 3 slice 1 -> [4, 2]; every changing cell
#     flips twice per pass -> max 2; 2 rows programmed per pass
#  twos_complement (c = 3): 3 = 011 -> [1,1,0], -1 = 111 -> [1,1,1]
#     initial 2 + 1 = 3; per pass 1 + 1 = 2, all in slice 2; 1 set 1 reset; max 2
#  offset (u = q + 3, c = 3): 6 = 110 -> [0,1,1], 2 = 010 -> [0,1,0]
#     initial 2 + 1 = 3; per pass 2, slice 2 only
HAND = {
    "differential": dict(initial_writes=5, writes_per_pass=6, set_writes_per_pass=3,
                         reset_writes_per_pass=3, pulses_per_pass=6,
                         rows_programmed_per_pass=2, max_cell_writes_per_pass=2,
                         per_slice={"0": 4, "1": 2}, tiles=2),
    "twos_complement": dict(initial_writes=3, writes_per_pass=2, set_writes_per_pass=1,
                            reset_writes_per_pass=1, pulses_per_pass=2,
                            rows_programmed_per_pass=2, max_cell_writes_per_pass=2,
                            per_slice={"0": 0, "1": 0, "2": 2}, tiles=2),
    "offset": dict(initial_writes=3, writes_per_pass=2, set_writes_per_pass=1,
                   reset_writes_per_pass=1, pulses_per_pass=2, rows_programmed_per_pass=2,
                   max_cell_writes_per_pass=2, per_slice={"0": 0, "1": 0, "2": 2}, tiles=2),
}


def two_weight_linear(w):
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([w]))
    return nn.Sequential(lin)


@pytest.mark.parametrize("enc", list(HAND))
def test_two_tile_layer_by_hand(enc):
    cfg = xb.CrossbarConfig(rows=1, cols=4, weight_bits=3, encoding=enc, sort="none")
    rep = xb.reprogram_report(xb.convert(two_weight_linear([3.0, -1.0]), cfg)).to_dict()
    for k, v in HAND[enc].items():
        assert rep[k] == v, k


def test_two_tile_pulses_count_level_steps():
    # 2 bits per cell, twos complement, 3-bit weights: 3 = 011 -> levels [3, 0],
    # -1 = 111 -> [3, 1]: only the top cell changes, by one level: 0 -> 1 -> 0 -> 1.
    # With w = [3, -3]: -3 = 101 -> [1, 1]; cell 0 steps 3 -> 1 (2 pulses), cell 1 0 -> 1.
    cfg = xb.CrossbarConfig(rows=1, cols=2, weight_bits=3, bits_per_cell=2,
                            encoding="twos_complement", sort="none")
    rep = xb.reprogram_report(xb.convert(two_weight_linear([3.0, -3.0]), cfg)).to_dict()
    # pass 1: tile0 writes cell0 (0->3, 3 pulses); tile1 cell0 3->1 (2), cell1 0->1 (1)
    assert rep["initial_writes"] == 3
    # pass 2: tile0 cell0 1->3 (2 pulses, set), cell1 1->0 (1, reset); tile1 reverses it
    assert rep["writes_per_pass"] == 4
    assert rep["pulses_per_pass"] == 6
    assert rep["set_writes_per_pass"] == 2 and rep["reset_writes_per_pass"] == 2


def test_sorting_reduces_writes_on_a_hand_case():
    # Two filters of 4 weights in 2-row sections: sorted by magnitude, each section holds
    # similar magnitudes, so consecutive tiles differ less than unsorted ones.
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[7.0, 0.0, 7.0, 0.0]]))
    cfg = xb.CrossbarConfig(rows=2, cols=6, weight_bits=4, sort="magnitude")
    rep = xb.reprogram_report(xb.convert(nn.Sequential(lin), cfg)).to_dict()
    # sorted sections: [7, 7] then [0, 0]: per pass 2 x (3 + 3) = 12 writes;
    # unsorted: [7, 0] then [7, 0]: identical tiles, 0 writes per pass.
    assert rep["writes_per_pass"] == 12 and rep["baseline_writes_per_pass"] == 0
    cfg2 = xb.CrossbarConfig(rows=2, cols=6, weight_bits=4, sort="none")
    rep2 = xb.reprogram_report(xb.convert(nn.Sequential(lin), cfg2)).to_dict()
    assert rep2["writes_per_pass"] == 0 and rep2["reduction"] is None


def test_model_that_fits_in_the_pool_costs_nothing_per_pass():
    m = small_model(1)
    cfg = xb.CrossbarConfig(rows=8, cols=32)
    tiles = xb.reprogram_report(xb.convert(m, cfg)).to_dict()["tiles"]
    rep = xb.reprogram_report(xb.convert(m, cfg.replace(pool=tiles))).to_dict()
    assert rep["writes_per_pass"] == 0 and rep["initial_writes"] > 0
    assert rep["max_cell_writes_per_pass"] == 0
    rep = xb.reprogram_report(xb.convert(m, cfg.replace(pool=tiles - 1))).to_dict()
    assert rep["writes_per_pass"] > 0


def test_full_reprogram_fraction_equals_no_stucking():
    m = small_model(2)
    cfg = xb.CrossbarConfig(rows=8, cols=32, pool=2)
    a = xb.reprogram_report(xb.convert(m, cfg)).to_dict()
    b = xb.reprogram_report(xb.convert(m, cfg.replace(stuck_slices=5,
                                                      reprogram_fraction=1.0))).to_dict()
    for k in COUNT_KEYS + ["per_slice"]:
        assert a[k] == b[k]


@pytest.mark.parametrize("stuck_value", ["initial", 0, 1])
def test_zero_fraction_freezes_low_slices(stuck_value):
    m = small_model(4)
    cfg = xb.CrossbarConfig(rows=8, cols=40, stuck_slices=3, reprogram_fraction=0.0,
                            stuck_value=stuck_value)
    rep = xb.reprogram_report(xb.convert(m, cfg)).to_dict()
    assert [rep["per_slice"][str(s)] for s in range(3)] == [0, 0, 0]
    assert all(rep["per_slice"][str(s)] > 0 for s in range(3, cfg.slices))
    if stuck_value != "initial":
        free = xb.reprogram_report(xb.convert(m, cfg.replace(stuck_slices=0)))
        # cells stuck at a fixed level are never written, not even initially
        assert rep["initial_writes"] < free.to_dict()["initial_writes"]


def test_stuck_values_are_what_the_layers_hold():
    m = small_model(5, conv=False)
    for sv in (0, 1):
        cfg = xb.CrossbarConfig(rows=8, cols=28, stuck_slices=7, reprogram_fraction=0.0,
                                stuck_value=sv)
        xm = xb.convert(m, cfg)
        for _, layer in xb.crossbar_layers(xm):
            # every used cell of every slice is stuck: all levels equal the stuck value
            assert layer.stuck_cells().all()
            assert (layer.held_cells() == sv).all()


def test_sorting_never_changes_outputs_without_stucking():
    m = small_model(6)
    x = torch.randn(3, 4, 5, 5)
    outs = []
    for key in ("none", "magnitude", "value"):
        xm = xb.convert(m, xb.CrossbarConfig(rows=8, cols=32, sort=key)).eval()
        outs.append(xm[:2](x))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_stuck_cells_never_change_after_first_pass_even_after_finetuning():
    m = small_model(7)
    cfg = xb.CrossbarConfig(rows=8, cols=32, stuck_slices=4, reprogram_fraction=0.3, pool=3)
    xm = xb.convert(m, cfg)
    held = {n: (l.stuck_cells(), l.held_cells()[l.stuck_cells()]) for n, l in xb.crossbar_layers(xm)}
    assert sum(s.sum().item() for s, _ in held.values()) > 0
    with torch.no_grad():
        for p in xm.parameters():
            p.add_(torch.randn_like(p) * p.abs().mean())
    xb.reprogram(xm)
    for n, l in xb.crossbar_layers(xm):
        stuck, levels = held[n]
        assert torch.equal(l.stuck_cells(), stuck)
        assert torch.equal(l.held_cells()[stuck], levels)
    # and a second pass on top never writes a stuck cell: replaying gives the same counts
    r1 = xb.reprogram_report(xm).to_dict()
    r2 = xb.reprogram_report(xm).to_dict()
    assert r1 == r2


def test_reprogramming_reuses_the_stuck_flags_it_computed(monkeypatch):
    """A reprogramming replays each layer's masks, first tile, placement and tile order: it keeps
    the stuck flags they gave (computing none), the flags a fresh computation gives. Flags
    changed in place, or a layer whose placement was replaced, are computed again."""
    from crossbar_torch.programming import CrossbarPool
    m = small_model(8)
    cfg = xb.CrossbarConfig(rows=8, cols=32, stuck_slices=2, reprogram_fraction=0.3, pool=3,
                            sort="value", filter_order="chain")
    xm = xb.convert(m, cfg)
    layers = [l for _, l in xb.crossbar_layers(xm)]
    flags = [l.stuck.clone() for l in layers]
    assert sum(int(f.count_nonzero()) for f in flags) > 0
    calls, computed = [], CrossbarPool.layer_stuck

    def counted(self, *args, **kwargs):
        calls.append(args[3])  # the first tile
        return computed(self, *args, **kwargs)
    monkeypatch.setattr(CrossbarPool, "layer_stuck", counted)
    xb.reprogram(xm)
    assert calls == [] and all(torch.equal(l.stuck, f) for l, f in zip(layers, flags))
    layers[0].stuck.zero_()  # no longer the flags computed (nor what the crossbars hold)
    layers[1].filter_index = layers[1].filter_index.clone()  # another tensor, the same values
    xb.reprogram(xm)
    assert len(calls) == 2 and all(torch.equal(l.stuck, f) for l, f in zip(layers, flags))
    # converted and reprogrammed under inference mode (buffers without version counters):
    # nothing to stamp, so the flags are computed each time, the same ones
    calls.clear()
    with torch.inference_mode():
        xi = xb.convert(m, cfg)
        xb.reprogram(xi)
    assert len(calls) == 2 * len(layers)
    assert all(torch.equal(l.stuck, f) for (_, l), f in zip(xb.crossbar_layers(xi), flags))


def test_stuck_mask_is_a_pure_function_and_has_the_right_rate():
    cfg = xb.CrossbarConfig(rows=128, cols=128, stuck_slices=7, reprogram_fraction=0.25,
                            seed=11)
    a, b = xb.stuck_mask(cfg, 3), xb.stuck_mask(cfg, 3)
    assert torch.equal(a, b) and not torch.equal(a, xb.stuck_mask(cfg, 4))
    used = 9 * 14  # F * c columns are used
    rate = a[:, :used].float().mean().item()
    assert 0.72 < rate < 0.78  # 1 - p = 0.75 of the used cells
    assert not a[:, used:].any()


def test_per_layer_and_slice_totals_add_up():
    m = small_model(8)
    rep = xb.reprogram_report(xb.convert(m, xb.CrossbarConfig(rows=8, cols=32, pool=2)))
    d = rep.to_dict()
    assert sum(l["writes_per_pass"] for l in d["layers"]) == d["writes_per_pass"]
    assert sum(d["per_slice"].values()) == d["writes_per_pass"]
    assert d["set_writes_per_pass"] + d["reset_writes_per_pass"] == d["writes_per_pass"]
    assert sum(l["tiles"] for l in d["layers"]) == d["tiles"]


@pytest.mark.parametrize("shapes", [[(0, 3), (3, 5)], [(5, 0), (0, 4)], [(5, 3), (3, 0)],
                                    [(1, 1)], [(1, 200), (200, 1)]])
def test_empty_and_odd_layers_match_simulator(shapes):
    """Layers with no weights take no tiles and no writes; 1-weight filters still count."""
    m = nn.Sequential(*[nn.Linear(i, o) for i, o in shapes])
    cfg = xb.CrossbarConfig(rows=8, cols=30, stuck_slices=2, reprogram_fraction=0.5, pool=2)
    xm, rep = assert_matches_simulator(m, cfg)
    x = torch.randn(2, shapes[0][0])
    assert xm.eval()(x).shape == m(x).shape


# Rule 22 on top of rules 1 to 13: per-layer stucking and compensation (layer_overrides).
override_configs = st.builds(
    dict, base=mapping_configs,
    overrides=st.lists(st.tuples(st.sampled_from(["0", "1", "[23]", "*", "3"]),
                                 st.integers(0, 3), st.sampled_from([0.0, 0.4, 1.0]),
                                 st.booleans()), min_size=1, max_size=3))


def make_override_config(d):
    cfg = make_mapping_config(d["base"]).replace(stuck_value="initial")
    overrides = {}
    for pattern, L, p, comp in d["overrides"]:
        L = min(L, cfg.slices)
        if comp and cfg.arrays * L * cfg.bits_per_cell > 12:  # keep the naive search small
            comp = False
        overrides[pattern] = {"stuck_slices": L, "reprogram_fraction": p, "compensate": comp}
    return cfg.replace(layer_overrides=overrides)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=override_configs, seed=st.integers(0, 1000))
def test_layer_overrides_match_independent_simulator(cfg, seed):
    cfg = make_override_config(cfg)
    xm, _ = assert_matches_simulator(small_model(seed), cfg)
    for name, layer in xb.crossbar_layers(xm):  # each layer's stuck cells are its own policy's
        assert bool(layer.stuck.numel()) == cfg.for_layer(name).stucking, name


def test_layer_override_pattern_matching_nothing_is_an_error():
    cfg = xb.CrossbarConfig(layer_overrides={"*.output.dense": {"stuck_slices": 1,
                                                                 "reprogram_fraction": 0.0}})
    with pytest.raises(ValueError, match=r"\['\*\.output\.dense'\] match no crossbar layer"):
        xb.convert(small_model(0), cfg)
    with pytest.raises(ValueError, match=r"layer_overrides\['x'\]: field\(s\) \['rows'\]"):
        xb.CrossbarConfig(layer_overrides={"x": {"rows": 4}})
    with pytest.raises(ValueError, match=r"layer_overrides\['x'\].*stuck_slices"):
        xb.CrossbarConfig(layer_overrides={"x": {"stuck_slices": 99}})
    with pytest.raises(ValueError, match="stuck_value='initial'"):
        xb.CrossbarConfig(stuck_value=0, layer_overrides={"x": {"stuck_slices": 1,
                                                                "reprogram_fraction": 0.5}})


@pytest.mark.parametrize("bits_per_cell, compensate", [(1, True), (5, True), (5, False)])
def test_layer_targets_leave_the_stored_cells_as_they_are(bits_per_cell, compensate):
    """A later programming's targets mark the stuck cells' levels in the unpacked copies of the
    layer's buffers, in place: with one cell a byte (b >= 5) the packed buffer is the levels
    themselves, and it must come out unchanged (and the targets as computed out of place)."""
    from crossbar_torch.programming import NOT_PINNED, layer_targets
    cfg = xb.CrossbarConfig(rows=5, cols=40, weight_bits=7, bits_per_cell=bits_per_cell,
                            stuck_slices=1, reprogram_fraction=0.3, sort="value",
                            compensate=compensate, seed=3)
    xm = xb.convert(small_model(4, conv=False), cfg)
    for _, layer in xb.crossbar_layers(xm):
        cells, stuck = layer.cells.clone(), layer.stuck.clone()
        stuck_cells, held = layer.stuck_cells(), layer.held_cells()
        assert bool(stuck_cells.any())
        target, pinned = layer_targets(layer, cfg, baseline=False)
        assert torch.equal(layer.cells, cells) and torch.equal(layer.stuck, stuck)
        plain = layer.target_cells()
        if compensate:
            assert torch.equal(target, plain)
            assert torch.equal(pinned, torch.where(stuck_cells, held,
                                                   torch.full_like(held, NOT_PINNED)))
        else:
            assert pinned is None and torch.equal(target, torch.where(stuck_cells, held, plain))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=st.one_of(mapping_configs.map(make_mapping_config),
                     override_configs.map(make_override_config)),
       seed=st.integers(0, 1000))
def test_skipping_known_levels_once_every_cell_is_written_changes_nothing(cfg, seed):
    """A reprogramming (after the weights moved, as after fine-tuning) leaves out the stuck
    cells' known levels for a layer once the pool has written every cell the layer can cover
    (``CrossbarPool.all_written``): a stuck cell takes a level only on its first write. The
    cells, stuck flags and counts must be those of building the levels for every layer
    (placements, schedules, pools, per-layer stucking of rule 22)."""
    from crossbar_torch.programming import CrossbarPool
    config = cfg
    if not config.stucking and not config.layer_overrides:
        config = config.replace(stuck_slices=1, reprogram_fraction=0.3)
    g = torch.Generator().manual_seed(seed)
    models = []
    answers = []
    real = CrossbarPool.all_written
    for always_build in (False, True):
        xm = xb.convert(small_model(seed), config)
        with torch.no_grad():
            for p in xm.parameters():
                p.add_(torch.randn(p.shape, generator=g.manual_seed(seed)) * p.abs().mean())

        def spy(pool, geom, always_build=always_build):
            answers.append(real(pool, geom))
            return False if always_build else answers[-1]

        CrossbarPool.all_written = spy
        try:
            result = xb.reprogram(xm)
        finally:
            CrossbarPool.all_written = real
        models.append((xm, result))
    (a, ra), (b, rb) = models
    for (_, la), (_, lb) in zip(xb.crossbar_layers(a), xb.crossbar_layers(b)):
        assert torch.equal(la.cells, lb.cells) and torch.equal(la.stuck, lb.stuck)
    assert ra.initial == rb.initial and ra.period_total == rb.period_total
    assert [e["writes_per_pass"] for e in ra.layers] == [e["writes_per_pass"] for e in rb.layers]
    # the pool was asked: every layer with stuck cells asks
    assert bool(answers) == any(la.stuck.numel() for _, la in xb.crossbar_layers(a))


def test_all_written_says_when_every_covered_cell_was_written():
    """The shortcut's condition, by hand: a pool that has programmed one layer covering every
    row and slot has written its cells (that layer's geometry), not those of a layer with more
    rows; a fresh pool has written nothing."""
    from crossbar_torch.mapping import LayerGeometry
    from crossbar_torch.programming import CrossbarPool
    cfg = xb.CrossbarConfig(rows=4, cols=16, weight_bits=4, bits_per_cell=1,
                            encoding="offset", stuck_slices=1, reprogram_fraction=0.5)
    pool = CrossbarPool(cfg)
    geom = LayerGeometry.of(4, 4, cfg)  # 4 filters of 4 cells: 4 slots of 16 columns
    assert geom.F * geom.c == 16 and not pool.all_written(geom)
    cells = torch.ones(4, 4, cfg.cells_per_weight, dtype=torch.uint8)
    pool.program(cells, torch.arange(4), None, None, count_cells=False)
    assert pool.all_written(geom)
    assert pool.all_written(LayerGeometry.of(2, 3, cfg))  # fewer rows and slots: within
    pool = CrossbarPool(cfg)
    pool.program(cells[:, :3], torch.arange(4), None, None, count_cells=False)  # 3 rows
    assert not pool.all_written(geom) and pool.all_written(LayerGeometry.of(4, 3, cfg))
