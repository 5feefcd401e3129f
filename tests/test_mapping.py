"""Rules 11 to 13 in the model: filter placement, the stored tile order, compensation, the
baseline, and the state that round-trips (docs/semantics.md). Counts and effective weights
against the independent simulator are in test_programming.py."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import crossbar_torch as xb
from crossbar_torch.mapping import LayerGeometry, filter_index, format_order


def small_model(seed=0):
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 12, 3, groups=3),
                      nn.ReLU(), nn.Flatten(), nn.Linear(12 * 4 * 4, 10))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * torch.rand(p.shape[:1] + (1,) * (
                p.dim() - 1), generator=g))  # filters of different sizes: profile matters
    return m.eval()


def test_profile_placement_by_hand():
    """Profiles sum|q| = [3, 9, 1, 7, 5] -> ranking [1, 3, 4, 0, 2]; F = 2 slots (cols 28 of
    14-cell weights), nb = 3 blocks: block j holds ranks j, j + 3 -> [1, 0], [3, 2], [4, -]."""
    q = torch.tensor([[3, 0], [-9, 0], [1, 0], [0, 7], [5, 0]], dtype=torch.int32)
    cfg = xb.CrossbarConfig(cols=28, filter_order="profile")
    assert filter_index(q, cfg).tolist() == [1, 0, 3, 2, 4, -1]
    assert filter_index(q, cfg.replace(filter_order="natural")).tolist() == [0, 1, 2, 3, 4, -1]
    # ties keep the lower filter first (stable)
    q = torch.tensor([[2], [2], [5]], dtype=torch.int32)
    assert filter_index(q, cfg).tolist() == [2, 1, 0, -1]


@pytest.mark.parametrize("enc, b, sort", [("differential", 1, "value"),
                                          ("twos_complement", 2, "magnitude"),
                                          ("offset", 3, "none")])
def test_chain_order_is_a_nearest_neighbour_chain(enc, b, sort):
    """chain_order against a per-cell python recomputation: Hamming distances between the
    bits of the encoded sorted rows, start at the largest sum |q|, nearest unvisited next,
    ties to the lowest filter."""
    from crossbar_torch.mapping import chain_order
    from crossbar_torch.ops import reference as ref
    g = torch.Generator().manual_seed(3)
    cfg = xb.CrossbarConfig(encoding=enc, bits_per_cell=b, sort=sort, cols=64)
    q = torch.randint(-20, 21, (13, 6), generator=g, dtype=torch.int32)
    q[4] = q[7]  # equal rows: distance 0, and a tie for the lowest number
    rows = []
    for o in range(13):
        row = sorted(range(6), key=lambda k: (-abs(int(q[o, k])) if sort == "magnitude" else
                                              -int(q[o, k]) if sort == "value" else 0, k))
        cells = ref.encode(q[o, row], 8, b, cfg.encoding_id).flatten().tolist()
        rows.append([(v >> p) & 1 for v in cells for p in range(b)])
    ham = [[sum(x != y for x, y in zip(a, c)) for c in rows] for a in rows]
    sums = [int(q[o].abs().sum()) for o in range(13)]
    cur = sums.index(max(sums))
    want, left = [cur], set(range(13)) - {cur}
    while left:
        cur = min(left, key=lambda o: (ham[cur][o], o))
        want.append(cur)
        left.remove(cur)
    assert chain_order(q, cfg).tolist() == want


@pytest.mark.parametrize("sort", ["none", "magnitude", "value"])
def test_outputs_are_bit_identical_for_every_placement_and_schedule(sort):
    """Without stucking neither the sort, the placement nor the tile order changes a result."""
    model = small_model()
    x = torch.randn(2, 3, 6, 6)
    base = xb.convert(model, xb.CrossbarConfig(rows=16, cols=28, sort="none"))(x)
    for order in ("natural", "profile", "chain"):
        for schedule in ("section_major", "greedy"):
            cfg = xb.CrossbarConfig(rows=16, cols=28, sort=sort, filter_order=order,
                                    schedule=schedule, schedule_window=3)
            assert torch.equal(xb.convert(model, cfg)(x), base), (order, schedule)


def test_baseline_is_rules_1_to_10():
    cfg = xb.CrossbarConfig(sort="value", filter_order="profile", schedule="greedy",
                            stuck_slices=2, reprogram_fraction=0.5, compensate=True)
    b = cfg.baseline()
    assert (b.sort, b.filter_order, b.schedule, b.stuck_slices, b.compensate) == (
        "none", "natural", "section_major", 0, False)
    model = small_model()
    plain = xb.reprogram_report(xb.convert(model, xb.CrossbarConfig(rows=16, cols=28,
                                                                    sort="none")))
    rep = xb.reprogram_report(xb.convert(model, cfg.replace(rows=16, cols=28)))
    assert rep.to_dict()["baseline_writes_per_pass"] == plain.writes_per_pass


def test_greedy_never_costs_more_here_and_the_order_is_stored_and_replayed():
    model = small_model(1)
    cfg = xb.CrossbarConfig(rows=8, cols=28, sort="value", filter_order="profile",
                            schedule="greedy", stuck_slices=1, reprogram_fraction=0.5,
                            compensate=True, pool=2)
    xm = xb.convert(model, cfg)
    rep = xb.reprogram_report(xm).to_dict()
    for (name, layer), lrep in zip(xb.crossbar_layers(xm), rep["layers"]):
        geom = LayerGeometry.of(layer.cells.shape[0], layer.cells.shape[1], cfg)
        assert sorted(layer.tile_order.tolist()) == list(range(geom.tiles))
        assert lrep["tile_order"] == layer.tile_order.tolist()
    assert any(l.tile_order.tolist() != sorted(l.tile_order.tolist())
               for _, l in xb.crossbar_layers(xm))  # greedy moved something
    before = {n: l.tile_order.clone() for n, l in xb.crossbar_layers(xm)}
    with torch.no_grad():  # fine-tuning changes weights: the order stays (rule 12)
        for _, l in xb.crossbar_layers(xm):
            l.weight.mul_(0.9)
    xb.reprogram(xm)
    for n, l in xb.crossbar_layers(xm):
        assert torch.equal(l.tile_order, before[n])
    assert "tile order" in str(xb.reprogram_report(xm))


def test_state_dict_round_trips_placement_order_and_counts():
    model = small_model(2)
    cfg = xb.CrossbarConfig(rows=8, cols=28, sort="value", filter_order="profile",
                            schedule="greedy", stuck_slices=2, reprogram_fraction=0.5,
                            compensate=True)
    xm = xb.convert(model, cfg)
    sd = xm.state_dict()
    fresh = xb.convert(small_model(3), cfg)  # other weights, other placement and order
    fresh.load_state_dict(sd)
    for (n, a), (_, b) in zip(xb.crossbar_layers(xm), xb.crossbar_layers(fresh)):
        for buf in ("filter_index", "tile_order", "cells", "stuck", "sort_index", "scale"):
            assert torch.equal(getattr(a, buf), getattr(b, buf)), (n, buf)
    assert xb.reprogram_report(fresh).to_dict() == xb.reprogram_report(xm).to_dict()
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(fresh(x), xm(x))


def test_bad_filter_index_in_a_state_dict_is_refused():
    cfg = xb.CrossbarConfig(rows=8, cols=28, filter_order="profile")
    xm = xb.convert(small_model(), cfg)
    sd = xm.state_dict()
    sd["0.filter_index"] = sd["0.filter_index"].clone()
    sd["0.filter_index"][0] = sd["0.filter_index"][1]
    with pytest.raises(RuntimeError, match="crossbar layer 0: filter_index must place each"):
        xb.convert(small_model(), cfg).load_state_dict(sd)


def test_state_dict_from_before_rules_11_to_13_loads():
    """A checkpoint saved before placement and tile orders existed: its config lacks the new
    fields and its state dict the new buffers; they take their defaults."""
    cfg = xb.CrossbarConfig(rows=8, cols=28)
    xm = xb.convert(small_model(), cfg)
    sd = xm.state_dict()
    for k in [k for k in sd if k.endswith(("filter_index", "tile_order"))]:
        del sd[k]
    for k in [k for k in sd if k.endswith("_extra_state")]:
        old = dict(sd[k]["crossbar_config"])
        for f in ("filter_order", "schedule", "schedule_window", "compensate"):
            old.pop(f)
        sd[k] = {"crossbar_config": old}
    fresh = xb.convert(small_model(), cfg)
    fresh.load_state_dict(sd)
    assert xb.reprogram_report(fresh).writes_per_pass == xb.reprogram_report(xm).writes_per_pass


def weight_error(xm):
    num = den = 0.0
    for _, l in xb.crossbar_layers(xm):
        q = torch.clamp(torch.round(l.matrix_weight().detach().float() / l.scale[:, None]),
                        -l.config.qmax, l.config.qmax)
        num += (l.effective_q().float() - q).abs().sum().item()
        den += q.abs().sum().item()
    return num / den


def test_compensation_cuts_the_weight_error_of_stuck_cells():
    """Measured on this model: about 3x lower mean |q_eff - q| / mean |q| (Lite0's real
    weights: 3.4% -> 0.8% at 2 slices, p = 0.5)."""
    model = small_model(4)
    cfg = xb.CrossbarConfig(rows=16, cols=28, sort="value", stuck_slices=2,
                            reprogram_fraction=0.5)
    plain = weight_error(xb.convert(model, cfg))
    comp = weight_error(xb.convert(model, cfg.replace(compensate=True)))
    assert plain > 0.01 and comp < plain / 2, (plain, comp)


def test_train_forward_simulates_compensation():
    """Right after conversion the training forward (programming the same latent weights,
    the held cells as the tie-break reference) decodes to the held effective weights except
    where two values tie at the same distance (q - e and q + e); here: within 1 level."""
    model = small_model(5)
    cfg = xb.CrossbarConfig(rows=16, cols=28, sort="value", stuck_slices=2,
                            reprogram_fraction=0.5, compensate=True)
    xm = xb.convert(model, cfg)
    total = same = 0
    for _, l in xb.crossbar_layers(xm):
        with torch.no_grad():
            sim = l.simulated_weight()
        held = l.effective_weight()
        diff = ((sim - held).abs() / l.scale.view(-1, *[1] * (sim.dim() - 1))).round()
        assert diff.max() <= 2
        total += diff.numel()
        same += int((diff == 0).sum())
    assert same / total > 0.97, same / total
    # and it is not the uncompensated simulation
    l = xb.crossbar_layers(xm)[0][1]
    plain = copy.deepcopy(l)
    object.__setattr__(plain, "config", cfg.replace(compensate=False))
    with torch.no_grad():
        assert not torch.equal(plain.simulated_weight(), l.simulated_weight())


def test_second_convert_with_another_config_is_refused():
    xm = xb.convert(small_model(), xb.CrossbarConfig(rows=8, cols=28, stuck_slices=4,
                                                      reprogram_fraction=0.25))
    with pytest.raises(ValueError, match=r"already a crossbar layer.*stuck_slices"):
        xb.convert(xm, xb.CrossbarConfig(rows=8, cols=28))
    same = xb.convert(xm, xb.CrossbarConfig(rows=8, cols=28, stuck_slices=4,
                                            reprogram_fraction=0.25))
    assert all(l.config.stuck_slices == 4 for _, l in xb.crossbar_layers(same))


def test_convert_inside_inference_mode():
    with torch.inference_mode():
        model = small_model()
        xm = xb.convert(model, xb.CrossbarConfig(rows=8, cols=28))
        out = xm(torch.randn(1, 3, 6, 6))
    assert torch.isfinite(out).all()
    xm2 = xb.convert(small_model(), xb.CrossbarConfig(rows=8, cols=28))  # built outside
    with torch.inference_mode():
        xb.convert(small_model(), xb.CrossbarConfig(rows=8, cols=28))
        xm2(torch.randn(1, 3, 6, 6))


def test_no_false_stale_warning_after_deepcopy_or_compile_but_a_real_change_warns():
    xm = xb.convert(small_model(), xb.CrossbarConfig(rows=8, cols=28))
    x = torch.randn(1, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        copy.deepcopy(xm)(x)
        torch.compile(copy.deepcopy(xm), backend="aot_eager")(x)
        xm.float()(x)
    cp = copy.deepcopy(xm)
    with torch.no_grad():
        xb.crossbar_layers(cp)[0][1].weight.add_(1.0)
    with pytest.warns(UserWarning, match="latent weight changed"):
        cp(x)


def test_new_config_fields_validate():
    for bad, field in ((dict(filter_order="random"), "filter_order"),
                       (dict(schedule="fifo"), "schedule"),
                       (dict(schedule_window=0), "schedule_window"),
                       (dict(schedule_window=2.5), "schedule_window"),
                       (dict(compensate="yes"), "compensate"),
                       (dict(weight_bits=16, stuck_slices=15, compensate=True), "compensate")):
        with pytest.raises(ValueError, match=f"CrossbarConfig.{field}="):
            xb.CrossbarConfig(**bad)
    cfg = xb.load_config(None, ["filter_order=profile", "schedule=greedy",
                                "schedule_window=16", "compensate=true"])
    assert (cfg.filter_order, cfg.schedule, cfg.schedule_window, cfg.compensate) == (
        "profile", "greedy", 16, True)


def test_format_order():
    assert format_order([0, 1, 2, 5, 4, 6, 7]) == "0-2 5 4 6-7"
    assert format_order([]) == "-"
    text = format_order(list(range(0, 200, 2)), width=20)
    assert text.startswith("0 2 4") and text.endswith("tiles)")


@pytest.mark.parametrize("extra", [
    dict(),
    dict(stuck_slices=2, reprogram_fraction=0.4, filter_order="chain", compensate=True),
    dict(stuck_slices=3, reprogram_fraction=0.3, stuck_value=1, schedule="greedy",
         schedule_window=2, filter_order="profile", compensate=True, pool=3),
    dict(stuck_slices=2, reprogram_fraction=0.5, schedule="greedy", pool=2),
])
def test_report_reuses_the_last_programming_only_when_nothing_changed(extra):
    """reprogram_report takes the counts of convert's programming when the model is unchanged:
    they must be exactly what programming it again gives; any change makes it count again."""
    cfg = xb.CrossbarConfig(rows=6, cols=28, sort="value", seed=3, **extra)
    xm = xb.convert(small_model(4), cfg)
    fresh = xb.reprogram_report(xm, reuse=False).to_dict()
    reused = xb.reprogram_report(xm)
    assert reused.result is xm.crossbar_program          # really reused ...
    assert reused.to_dict() == fresh                     # ... and the same numbers
    layer = xb.crossbar_layers(xm)[0][1]
    with torch.no_grad():
        layer.weight.mul_(-1.0)                          # latent weight changed in place
    again = xb.reprogram_report(xm)
    assert again.result is not xm.crossbar_program
    assert again.to_dict() == xb.reprogram_report(xm, reuse=False).to_dict()
    xb.reprogram(xm)
    assert xb.reprogram_report(xm).result is xm.crossbar_program
    xm.load_state_dict(copy.deepcopy(xm.state_dict()))   # buffers copied in place: versions move
    assert xb.reprogram_report(xm).result is not xm.crossbar_program
    clone = copy.deepcopy(xm)                             # new tensors: counted again
    assert xb.reprogram_report(clone).result is not clone.crossbar_program
    assert xb.reprogram_report(clone).to_dict() == xb.reprogram_report(xm, reuse=False).to_dict()


def test_nan_weights_are_refused_naming_the_layer():
    model = small_model(1)
    with torch.no_grad():
        model[2].weight.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=r"convert: layer 2: .*NaN or Inf"):
        xb.convert(model, xb.CrossbarConfig(rows=6, cols=28))
    xm = xb.convert(small_model(1), xb.CrossbarConfig(rows=6, cols=28))
    with torch.no_grad():
        xm[2].weight.view(-1)[5] = float("inf")
    with pytest.raises(ValueError, match=r"^2\.weight holds 1 NaN or Inf"):
        xb.reprogram(xm)
