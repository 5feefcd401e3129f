"""The frontier's paired comparison of top-1 with the reference row (issue 18).

* ``paired_top1_drop`` against hand computations of the Bonett-Price interval on tiny vectors;
* ``encode_bits`` / ``decode_bits`` on hand examples, and refusing text of the wrong length;
* ``run_frontier`` end to end on the tiny CNN of test_frontier.py: every row's per-image
  ``top1_bits`` is the correctness of its own forward pass (recomputed here), and its lost /
  gained counts and interval follow from those and the reference's; a resumed CSV keeps them.
"""
import csv
import json
import math

import pytest
import torch

import crossbar_torch as xb
import crossbar_torch.apps.frontier as fr
from test_frontier import folder_tensors, make_folder, read_csv, scorer_for, tiny_model, \
    write_sweep


def test_paired_drop_matches_a_hand_computation():
    # ref right on images 0, 1, 3; row right on 1, 2: lost {0, 3} = 2, gained {2} = 1, n = 4
    d = fr.paired_top1_drop([1, 1, 0, 1], [0, 1, 1, 0])
    assert (d["lost"], d["gained"], d["n"]) == (2, 1, 4)
    assert d["drop"] == pytest.approx(25.0)
    # by hand: pl = 3/6 = 0.5, pg = 2/6; var = (5/6 - (1/6)^2) / 6 = 29/216 = 0.134259...
    # half = 1.959964 * 0.366414 = 0.718160; (1/6 -/+ half) * 100
    assert d["low"] == pytest.approx(-55.1493, abs=1e-3)
    assert d["high"] == pytest.approx(88.4826, abs=1e-3)
    # no image changes, n = 500: +-1.96 * sqrt(2 / 502^2) = +-0.005522 -> +-0.5522 points
    same = fr.paired_top1_drop([1] * 400 + [0] * 100, [1] * 400 + [0] * 100)
    assert same["drop"] == 0 and same["lost"] == same["gained"] == 0
    assert same["low"] == pytest.approx(-0.55215, abs=1e-4)
    assert same["high"] == pytest.approx(0.55215, abs=1e-4)
    # only the discordant pairs matter: 10 lost, 2 gained of 500, concordant ones reshuffled
    a = [1] * 10 + [0] * 2 + [1] * 300 + [0] * 188
    b = [0] * 10 + [1] * 2 + [1] * 300 + [0] * 188
    d = fr.paired_top1_drop(a, b)
    assert d["drop"] == pytest.approx(1.6)
    pl, pg = 11 / 502, 3 / 502
    half = 1.959963984540054 * math.sqrt((pl + pg - (pl - pg) ** 2) / 502)
    assert d["low"] == pytest.approx(100 * (pl - pg - half))
    # by hand: pl - pg = 0.015936, var = (0.027888 - 0.000254) / 502 = 5.5048e-5,
    # half = 1.96 * 0.0074195 = 0.014542
    assert d["low"] == pytest.approx(0.1394, abs=1e-3)
    assert d["high"] == pytest.approx(3.0478, abs=1e-3)
    d2 = fr.paired_top1_drop([0] * 188 + a[:312], [0] * 188 + b[:312])
    assert (d2["lost"], d2["gained"]) == (10, 2) and d2["low"] == pytest.approx(d["low"])
    with pytest.raises(ValueError, match="same non-zero number"):
        fr.paired_top1_drop([1, 0], [1])


def test_bits_round_trip_and_refuse_wrong_length():
    assert fr.encode_bits([1, 0, 1, 1, 1]) == "b8"
    assert fr.encode_bits([True, False, False, False]) == "8"
    assert fr.encode_bits([]) == ""
    assert fr.decode_bits("b8", 5) == [1, 0, 1, 1, 1]
    flags = [int(c) for c in "0110100111010001011"]
    assert fr.decode_bits(fr.encode_bits(flags), len(flags)) == flags
    with pytest.raises(ValueError, match="expected 2 hex digits for 5 images"):
        fr.decode_bits("b", 5)
    with pytest.raises(ValueError, match="hex digits"):
        fr.decode_bits("zz", 5)


SWEEP = """
base: {rows: 8, cols: 28, weight_bits: 8, sort: none, seed: 0}
runs:
  - {name: crossbar8}
  - {name: value+chain, sort: value, filter_order: chain}
  - {name: value 4@0.25, sort: value, stuck_slices: 4, reprogram_fraction: 0.25}
  - {name: chain 7@0, sort: value, filter_order: chain, stuck_slices: 7, reprogram_fraction: 0}
  - {name: chain 7@0.5, sort: value, filter_order: chain, stuck_slices: 7, reprogram_fraction: 0.5}
"""


def test_rows_keep_per_image_correctness_and_the_paired_interval(tmp_path):
    model = tiny_model()
    root = make_folder(tmp_path / "val", model, n=15)
    runs = fr.load_sweeps([write_sweep(tmp_path / "s.yaml", SWEEP)])
    x, y = folder_tensors(root)
    csv_path = str(tmp_path / "f.csv")
    fr.run_frontier(model, runs[:2], scorer_for(root), csv_path=csv_path)
    fr.run_frontier(model, runs, scorer_for(root), csv_path=csv_path,  # resumes 2 rows
                    json_path=str(tmp_path / "f.json"))
    csv_rows = {r["name"]: r for r in read_csv(csv_path)}
    js_rows = {r["name"]: r for r in json.loads((tmp_path / "f.json").read_text())["rows"]}
    correct = {}
    for run in runs:
        with torch.no_grad():
            correct[run.name] = (xb.convert(model, run.config)(x).argmax(1) == y).int().tolist()
    assert any(correct[n] != correct["crossbar8"] for n in correct), "no row differs: weak test"
    ref = correct["crossbar8"]
    for name, c in correct.items():
        lost = sum(1 for a, b in zip(ref, c) if a and not b)
        gained = sum(1 for a, b in zip(ref, c) if b and not a)
        for got in (csv_rows[name], js_rows[name]):
            assert fr.decode_bits(got["top1_bits"], len(y)) == c
            assert int(got["top1_lost"]) == lost and int(got["top1_gained"]) == gained
            if name == "crossbar8":
                assert got["top1_drop_ci_low"] in ("", None)
                continue
            pl, pg = (lost + 1) / (len(y) + 2), (gained + 1) / (len(y) + 2)
            half = 1.959963984540054 * math.sqrt((pl + pg - (pl - pg) ** 2) / (len(y) + 2))
            assert float(got["top1_drop_ci_low"]) == pytest.approx(100 * (pl - pg - half))
            assert float(got["top1_drop_ci_high"]) == pytest.approx(100 * (pl - pg + half))
            assert float(got["top1_drop_ci_low"]) < float(got["top1_drop"]) + 1e-9 or lost == gained


def test_a_row_without_bits_gets_no_interval():
    ref = {"name": "crossbar8", "images": 4, "top1_bits": "d"}
    assert fr.ImageScorer.paired(ref, {"name": "x", "images": 4, "top1_bits": None}) == {
        "top1_drop_ci_low": None, "top1_drop_ci_high": None, "top1_lost": None,
        "top1_gained": None}
    got = fr.ImageScorer.paired(ref, {"name": "x", "images": 4, "top1_bits": "6"})
    assert (got["top1_lost"], got["top1_gained"]) == (2, 1)  # d = 1101, 6 = 0110


def test_a_resumed_csv_with_a_damaged_per_image_record_is_refused(tmp_path):
    model = tiny_model()
    root = make_folder(tmp_path / "val", model, n=6)
    runs = fr.load_sweeps([write_sweep(tmp_path / "s.yaml", SWEEP)])[:1]
    csv_path = tmp_path / "f.csv"
    fr.run_frontier(model, runs, scorer_for(root), csv_path=str(csv_path))
    rows = read_csv(csv_path)
    assert len(rows[0]["top1_bits"]) == 2  # 6 images: 2 hex digits
    rows[0]["top1_bits"] = "abc"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(fr.FrontierError, match=r"line 2 \(row 'crossbar8'\) cannot be read "
                                               r"\(top1_bits: expected 2 hex digits"):
        fr.read_previous(str(csv_path), runs, fr.ImageScorer)


def test_the_script_table_shows_the_interval():
    from crossbar_torch.apps.cli_frontier import table
    rows = [{"name": "crossbar8", "writes_per_pass": 10, "reduction": 1.0, "top1": 88.0,
             "top1_drop": 0.0, "top1_drop_ci_low": None, "top1_drop_ci_high": None,
             "weight_error": 0.0},
            {"name": "chain+comp 1@0", "writes_per_pass": 5, "reduction": 2.0, "top1": 86.6,
             "top1_drop": 1.4, "top1_drop_ci_low": 0.136, "top1_drop_ci_high": 2.871,
             "weight_error": 0.017}]
    lines = table(rows, fr.ImageScorer).splitlines()
    assert "95% interval" in lines[0]
    assert "+0.14 .. +2.87" in lines[3] and ".." not in lines[2]
