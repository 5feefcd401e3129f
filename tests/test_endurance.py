"""Rules 15 and 16 (docs/semantics.md): lifetime and cost recomputed by hand from the counts,
the independent simulator's per-cell totals and the device presets' YAML; the report script's
--memristor flag."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import yaml

import crossbar_torch as xb
from conftest import REPO
from independent import simulate
from test_programming import small_model, weight_matrices

SCRIPT = os.path.join(REPO, "scripts", "reprogram_report.py")


def preset(name):
    with open(os.path.join(REPO, "crossbar_torch", "presets", "devices", f"{name}.yaml")) as f:
        return {k: float(v) for k, v in yaml.safe_load(f).items()
                if k not in ("name", "description")}


@pytest.mark.parametrize("device", ["rram", "pcm", "fefet", "default"])
@pytest.mark.parametrize("bits_per_cell,pool", [(1, 1), (2, 3)])
def test_energy_and_time_by_hand(device, bits_per_cell, pool):
    cfg = xb.CrossbarConfig(rows=8, cols=40, sort="value", bits_per_cell=bits_per_cell,
                            pool=pool, device=device)
    d = xb.reprogram_report(xb.convert(small_model(2), cfg)).to_dict()
    p = preset(device)
    sim = simulate(weight_matrices(small_model(2)), cfg.to_dict())
    set_pulses = sim["set_pulses_per_pass"]
    reset_pulses = sim["pulses_per_pass"] - set_pulses
    assert d["set_pulses_per_pass"] == set_pulses and d["reset_pulses_per_pass"] == reset_pulses
    assert d["set_energy_per_pass_j"] == pytest.approx(set_pulses * p["set_energy_j"], rel=1e-12)
    assert d["reset_energy_per_pass_j"] == pytest.approx(reset_pulses * p["reset_energy_j"],
                                                         rel=1e-12)
    assert d["write_energy_per_pass_j"] == pytest.approx(
        set_pulses * p["set_energy_j"] + reset_pulses * p["reset_energy_j"], rel=1e-12)
    slot = (2 ** bits_per_cell - 1) * (p["set_pulse_s"] + p["reset_pulse_s"])
    par = min(p["write_parallel_crossbars"], pool)
    assert d["write_time_per_pass_s"] == pytest.approx(
        sim["rows_programmed_per_pass"] * slot / par, rel=1e-12)
    base = simulate(weight_matrices(small_model(2)), cfg.baseline().to_dict())
    assert d["baseline_write_time_per_pass_s"] == pytest.approx(
        base["rows_programmed_per_pass"] * slot / par, rel=1e-12)
    assert d["mvm_read_energy_j"] == pytest.approx(d["tiles"] * p["read_energy_j"], rel=1e-12)
    if bits_per_cell == 2:  # multi-level: a write moves up to 3 levels, pulses > writes
        assert sim["pulses_per_pass"] > sim["writes_per_pass"]


@pytest.mark.parametrize("wear", ["none", "rotate_rows", "rotate"])
def test_lifetime_from_the_simulators_cells(wear):
    cfg = xb.CrossbarConfig(rows=6, cols=30, sort="magnitude", pool=2, device="fefet",
                            wear_leveling=wear)
    d = xb.reprogram_report(xb.convert(small_model(4), cfg)).to_dict()
    sim = simulate(weight_matrices(small_model(4)), cfg.to_dict())
    E, T = int(preset("fefet")["endurance"]), sim["period"]
    worn = sorted((v for v in sim["cell_period_writes"].values() if v), reverse=True)
    # ceil(E / (total / T)) in integers: the pass in which the cell takes its E-th write
    assert d["passes_to_first_failure"] == -(-E * T // worn[0])
    assert d["passes_to_1pct_failure"] == -(-E * T // worn[math.ceil(len(worn) / 100) - 1])
    base = simulate(weight_matrices(small_model(4)), cfg.baseline().to_dict())
    bmax = max(base["cell_period_writes"].values())
    assert d["baseline_passes_to_first_failure"] == -(-E // bmax)
    assert d["lifetime_gain"] == pytest.approx(d["passes_to_first_failure"] / -(-E // bmax))


def test_no_writes_never_wears():
    """Every tile fits the pool: a steady pass writes nothing, no cell wears."""
    cfg = xb.CrossbarConfig(rows=64, cols=64, pool=64)
    d = xb.reprogram_report(xb.convert(nn.Linear(8, 4), cfg)).to_dict()
    assert d["writes_per_pass"] == 0 and d["cell_writes_per_pass"]["worn_cells"] == 0
    assert d["passes_to_first_failure"] is None and d["write_energy_per_pass_j"] == 0.0


def test_report_table_and_csv_show_lifetime_and_cost():
    rep = xb.reprogram_report(xb.convert(small_model(1), xb.CrossbarConfig(rows=8, cols=28)),
                              device="pcm")
    text = str(rep)
    for what in ("passes to first cell failure", "lifetime gain", "write energy per pass",
                 "write time per pass", "'pcm'"):
        assert what in text, what
    header = rep.to_csv().splitlines()[0].split(",")
    assert {"max_cell_writes_per_pass", "passes_to_first_failure", "device"} <= set(header)


def script(*args):
    return subprocess.run([sys.executable, SCRIPT, "--quiet", "--model", "test_efficientnet",
                           "--random-init", "--set", "rows=32", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=600)


def test_script_unknown_device_lists_the_known_ones():
    r = script("--memristor", "memristor9000")
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert all(n in err[0] for n in ("memristor9000", "default", "fefet", "pcm", "rram"))


def test_script_device_yaml_with_bad_field_names_it(tmp_path):
    bad = dict(name="mine", description="x", endurance=0, set_energy_j=1e-12,
               reset_energy_j=1e-12, set_pulse_s=1e-8, reset_pulse_s=1e-8, read_energy_j=1e-12,
               write_parallel_crossbars=1)
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(bad))
    r = script("--memristor", str(path))
    assert r.returncode == 2 and "endurance" in r.stderr and "Traceback" not in r.stderr


def test_script_device_flag_reaches_the_json(tmp_path):
    r = script("--memristor", "pcm", "--json", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    import json
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["device"]["name"] == "pcm" and d["config"]["device"] == "pcm"
    assert d["device"]["endurance"] == preset("pcm")["endurance"]
    assert "passes to first cell failure" in r.stdout


def test_wear_leveling_report_averages_and_names_the_period():
    cfg = xb.CrossbarConfig(rows=4, cols=28, sort="value", wear_leveling="rotate_rows")
    rep = xb.reprogram_report(xb.convert(small_model(3), cfg))
    assert "period of 4 passes" in str(rep)
    assert rep.to_dict()["period_passes"] == 4
    torch.testing.assert_close(torch.tensor(float(rep.to_dict()["writes_per_pass"])),
                               torch.tensor(rep.result.period_total.writes / 4))
