"""scripts/reprogram_report.py end to end: single config, sweep, JSON / CSV / plot outputs."""
import csv
import json
import os
import subprocess
import sys

import pytest
import timm
import torch

import crossbar_torch as xb
from conftest import REPO

SCRIPT = os.path.join(REPO, "scripts", "reprogram_report.py")


def run(*args):
    r = subprocess.run([sys.executable, SCRIPT, "--quiet", *args], capture_output=True,
                       text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_single_config_outputs_match_the_library(tmp_path):
    out = run("--model", "test_efficientnet", "--random-init", "--config",
              os.path.join(REPO, "configs", "paper.yaml"), "--set", "rows=32", "--set",
              "cols=64", "--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv"),
              "--plot", str(tmp_path / "r.png"))
    assert "reduction (baseline / this)" in out
    d = json.loads((tmp_path / "r.json").read_text())
    # the script's random weights are not ours: check the config, the totals against the
    # per-layer rows, and the tiling (weights-independent) against the library
    cfg = xb.CrossbarConfig.from_dict(d["config"])
    assert (cfg.rows, cfg.cols, cfg.stuck_slices, cfg.reprogram_fraction) == (32, 64, 4, 0.25)
    assert sum(l["writes_per_pass"] for l in d["layers"]) == d["writes_per_pass"]
    assert sum(l["tiles"] for l in d["layers"]) == d["tiles"]
    torch.manual_seed(0)
    m = timm.create_model("test_efficientnet")
    assert d["tiles"] == xb.reprogram_report(xb.convert(m, cfg)).to_dict()["tiles"]
    rows = list(csv.reader(open(tmp_path / "r.csv")))
    assert rows[0][0] == "layer" and rows[-1][0] == "TOTAL"
    assert len(rows) == len(d["layers"]) + 2
    assert int(rows[-1][4]) == d["writes_per_pass"]
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_table_and_json(tmp_path):
    out = run("--model", "test_efficientnet", "--random-init", "--sweep",
              os.path.join(REPO, "configs", "sweep_paper.yaml"),
              os.path.join(REPO, "configs", "offset.yaml"), "--set", "rows=32",
              "--json", str(tmp_path / "s.json"), "--csv", str(tmp_path / "s.csv"))
    d = json.loads((tmp_path / "s.json").read_text())
    assert list(d)[:2] == ["baseline", "sorted"] and "offset" in d and len(d) == 8
    assert d["baseline"]["reduction"] == 1.0
    assert all(r["config"]["rows"] == 32 for r in d.values())
    # stucking only ever removes writes from the slices it freezes
    s, st = d["sorted"]["per_slice"], d["sorted+stuck4@0.25"]["per_slice"]
    assert all(st[k] == s[k] for k in ("4", "5", "6"))
    assert all(st[k] < s[k] for k in ("0", "1", "2", "3"))
    for name in d:
        assert name[:28] in out
    assert len(list(csv.reader(open(tmp_path / "s.csv")))) == 9


def test_bad_override_is_a_clear_error():
    r = subprocess.run([sys.executable, SCRIPT, "--model", "test_efficientnet", "--random-init",
                        "--set", "stuck_slices=99"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "stuck_slices=99" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_minilm_linear_layers():
    out = run("--model", "minilm", "--set", "stuck_slices=2", "--set", "reprogram_fraction=0.5")
    assert "layers 37" in out
