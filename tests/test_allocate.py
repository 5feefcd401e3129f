"""Rule 22's allocator (crossbar_torch/allocate.py): the Lagrangian choice against a brute
force over every per-layer assignment, the written policy, and the per-layer error measures
(the output gains themselves: tests/test_sensitivity.py)."""
import itertools

import pytest
import torch
import torch.nn as nn

import crossbar_torch as xb
from crossbar_torch import allocate as al
from crossbar_torch.sensitivity import LayerGain


def _brute(measured, budget):
    names = list(measured[0].writes)
    best = None
    for choice in itertools.product(range(len(measured)), repeat=len(names)):
        err = sum(measured[i].error[n] for n, i in zip(names, choice))
        if err > budget:
            continue
        writes = sum(measured[i].writes[n] for n, i in zip(names, choice))
        if best is None or writes < best:
            best = writes
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocation_meets_the_budget_close_to_the_best(seed):
    g = torch.Generator().manual_seed(seed)
    names = [f"l{i}" for i in range(5)]
    measured = []
    for c in range(3):  # more stucking: fewer writes, more error
        w = (torch.rand(5, generator=g) * 100 + 100 * (3 - c)).tolist()
        e = (torch.rand(5, generator=g) * (c + 1)).tolist()
        measured.append(al.Measured({"stuck_slices": c + 1}, dict(zip(names, w)),
                                    dict(zip(names, e))))
    budget = sum(measured[0].error.values()) * 1.5
    pick = al.allocate(measured, budget)
    err = sum(measured[i].error[n] for n, i in pick.items())
    writes = sum(measured[i].writes[n] for n, i in pick.items())
    assert err <= budget + 1e-9
    best = _brute(measured, budget)
    # a Lagrangian choice is optimal on the convex hull: never worse than the safest choice,
    # and within the largest single-layer step of the exact optimum
    assert writes <= sum(measured[0].writes.values())
    step = max(abs(a.writes[n] - b.writes[n]) for n in names for a in measured for b in measured)
    assert writes <= best + step


def test_policy_config_names_each_differing_layer():
    base = xb.CrossbarConfig(sort="value", compensate=True)
    m0 = al.Measured({"stuck_slices": 1, "reprogram_fraction": 0.0}, {"a.b": 1, "c[1]": 1, "d": 1},
                     {"a.b": 0, "c[1]": 0, "d": 0})
    m1 = al.Measured({"stuck_slices": 2, "reprogram_fraction": 0.0}, {"a.b": 1, "c[1]": 1, "d": 1},
                     {"a.b": 0, "c[1]": 0, "d": 0})
    cfg = al.policy_config(base, [m0, m1], {"a.b": 0, "c[1]": 1, "d": 0})
    assert cfg.stuck_slices == 1
    assert cfg.for_layer("c[1]").stuck_slices == 2 and cfg.for_layer("a.b").stuck_slices == 1
    assert cfg.for_layer("c1").stuck_slices == 1  # the pattern is the exact name


def test_layer_error_is_the_relative_output_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 6)).eval()
    x = torch.randn(50, 12)
    m = al.measure(model, xb.CrossbarConfig(rows=8, cols=28),
                   {"stuck_slices": 2, "reprogram_fraction": 0.0, "compensate": True},
                   lambda mm: mm(x))
    xm = xb.convert(model, xb.CrossbarConfig(rows=8, cols=28, stuck_slices=2,
                                             reprogram_fraction=0.0, compensate=True))
    with torch.no_grad():
        w, we = model[0].weight.double(), xm[0].effective_weight().double()
        want = float(((x.double() @ (we - w).T) ** 2).sum() / ((x.double() @ w.T) ** 2).sum())
    assert m.error["0"] == pytest.approx(want, rel=1e-5)
    assert m.writes["0"] == xb.reprogram_report(xm).to_dict()["layers"][0]["writes_per_pass"]



def test_measure_with_gains_predicts_from_the_shared_and_the_varying_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 4)).eval()
    x = torch.randn(50, 12) + 0.7  # a mean input row far from zero
    setting = {"stuck_slices": 2, "reprogram_fraction": 0.0, "compensate": True}
    mu = x.double().mean(0)
    gains = {"0": LayerGain(3.0, 40.0, mu), "2": LayerGain(0.5, 2.0, torch.zeros(6).double())}
    m = al.measure(model, xb.CrossbarConfig(rows=8, cols=28), setting, lambda mm: mm(x), gains)
    xm = xb.convert(model, xb.CrossbarConfig(rows=8, cols=28, **setting))
    with torch.no_grad():
        e = xm[0].effective_weight().double() - model[0].weight.double()
        energy = float(((x.double() @ e.T) ** 2).sum()) / len(x)  # tr(E H E^T)
        shared = float((e @ mu).pow(2).sum())
    assert 0 < shared < energy
    assert m.error["0"] == pytest.approx(3.0 * (energy - shared) + 40.0 * shared, rel=1e-5)
    with pytest.raises(ValueError, match=r"no gain for the crossbar layer\(s\) \['2'\]"):
        al.measure(model, xb.CrossbarConfig(rows=8, cols=28), setting, lambda mm: mm(x),
                   {"0": gains["0"]})


def test_measure_weighs_a_gain_candidate_by_the_gains_gain_run_measures():
    """A candidate with rule 26's filter weights is programmed after ``gain_run`` measured the
    gains: its writes are those of the model calibrated, given those gains and reprogrammed,
    and without ``gain_run`` reprogramming says what is missing."""
    from crossbar_torch.errors import ModelStateError
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 4)).eval()
    x = torch.randn(50, 12)
    base = xb.CrossbarConfig(rows=8, cols=28, sort="value", filter_order="chain")
    setting = {"feedback": "hessian", "write_penalty": 3.0, "filter_weight": "gain"}
    run = lambda mm: mm(x)  # noqa: E731
    with pytest.raises(ModelStateError, match="calibrate_gains"):
        al.measure(model, base, setting, run)
    m = al.measure(model, base, setting, run,
                   gain_run=lambda mm: xb.calibrate_gains(mm, run=run))
    xm = xb.convert(model, base.replace(**setting))
    xb.calibrate(xm, x)
    xb.calibrate_gains(xm, run=run)
    xb.reprogram(xm)
    layers = xb.reprogram_report(xm).to_dict()["layers"]
    assert [m.writes["0"], m.writes["2"]] == [e["writes_per_pass"] for e in layers]


@pytest.mark.slow
def test_allocate_command_on_minilm_writes_a_policy_of_its_candidates(tmp_path):
    """The whole command on MiniLM's real weights: gains by back-propagation, two candidates
    (the heavier penalty writes less), the policy written with its header and made of the
    candidates' settings."""
    import os
    import subprocess
    import sys
    import yaml
    pytest.importorskip("tokenizers")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cands = tmp_path / "cands.yaml"
    cands.write_text(
        "- {stuck_slices: 0, reprogram_fraction: 1.0, compensate: true, feedback: hessian,"
        " write_penalty: 1.0}\n"
        "- {stuck_slices: 0, reprogram_fraction: 1.0, compensate: true, feedback: hessian,"
        " write_penalty: 12.0}\n")
    out = tmp_path / "policy.yaml"
    run = subprocess.run(
        [sys.executable, os.path.join(root, "scripts", "allocate.py"), "--model", "minilm",
         "--candidates", str(cands), "--budget-factor", "2", "--calib-sentences", "16",
         "--gain-sentences", "8", "--out", str(out)],
        capture_output=True, text=True, cwd=root, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    text = out.read_text()
    assert "--sensitivity embedding" in text.splitlines()[0]
    cfg = xb.CrossbarConfig.from_yaml(str(out))
    lines = run.stderr.splitlines()
    writes = [float(l.split("writes/pass")[1].split()[0].replace(",", ""))
              for l in lines if "writes/pass" in l]
    assert len(writes) == 2 and writes[1] < writes[0]
    penalties = {cfg.write_penalty} | {o["write_penalty"] for o in
                                      yaml.safe_load(text)["layer_overrides"].values()}
    assert penalties <= {1.0, 12.0}
    assert "embedding gains of every layer on 8 calibration sentences" in run.stderr
