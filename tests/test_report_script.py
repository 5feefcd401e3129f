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
    assert int(rows[-1][rows[0].index("writes_per_pass")]) == d["writes_per_pass"]
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
    assert [d[n]["config"]["encoding"] for n in d].count("twos_complement") == 3


def test_bad_override_is_a_clear_error():
    r = subprocess.run([sys.executable, SCRIPT, "--model", "test_efficientnet", "--random-init",
                        "--set", "stuck_slices=99"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "stuck_slices=99" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_minilm_linear_layers():
    out = run("--model", "minilm", "--set", "stuck_slices=2", "--set", "reprogram_fraction=0.5")
    assert "layers 37" in out


@pytest.mark.slow
def test_a_feedback_preset_is_calibrated_before_it_is_counted(tmp_path):
    """configs/minilm_best.yaml (rules 21 and 23) programs from input moments: the script
    calibrates on the default --calibration sentences (the packaged corpus, as the frontier
    does) and reprograms, so it counts what the library counts along that route (it used to
    count the uncalibrated programming)."""
    from crossbar_torch.apps.frontier import feedback_sentences
    from crossbar_torch.apps.models import load_model
    from crossbar_torch.apps.models.minilm import encode_sentences, minilm_tokenizer
    out = tmp_path / "r.json"
    run("--model", "minilm", "--config", os.path.join(REPO, "configs", "minilm_best.yaml"),
        "--json", str(out))
    got = json.loads(out.read_text())["writes_per_pass"]
    cfg = xb.load_config(os.path.join(REPO, "configs", "minilm_best.yaml"))
    model = load_model("minilm").eval()
    xm = xb.convert(model, cfg)
    uncalibrated = xb.reprogram_report(xm).writes_per_pass
    text, tok = feedback_sentences(), minilm_tokenizer()
    xb.calibrate(xm, run=lambda m: encode_sentences(m, text, tok))
    xb.reprogram(xm)
    assert got == xb.reprogram_report(xm).writes_per_pass != uncalibrated


def test_a_feedback_config_on_an_image_model_is_one_line(tmp_path):
    cfg = tmp_path / "fb.yaml"
    cfg.write_text("sort: value\ncompensate: true\nstuck_slices: 1\nreprogram_fraction: 0.0\n"
                   "feedback: hessian\n")
    r = subprocess.run([sys.executable, SCRIPT, "--quiet", "--model", "test_efficientnet",
                        "--random-init", "--config", str(cfg)], capture_output=True, text=True,
                       cwd=REPO, timeout=600)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
        f"error: {cfg}: feedback='hessian' (rule 21) programs from input moments"), r.stderr


# ------------------------------------------------------------- outputs that are right (issue 12)

def _script():
    import importlib.util
    import sys
    if "_xb_report_script" not in sys.modules:
        spec = importlib.util.spec_from_file_location("_xb_report_script", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules["_xb_report_script"] = mod
    return sys.modules["_xb_report_script"]


def _rows(*configs):
    """(name, report dict) of a small two-layer model under each (name, config)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 12), torch.nn.ReLU(), torch.nn.Linear(12, 5))
    return [(name, xb.reprogram_report(xb.convert(model, cfg)).to_dict()) for name, cfg in configs]


DIFF = xb.CrossbarConfig(rows=8, cols=16)
TWOS = xb.CrossbarConfig(rows=8, cols=16, encoding="twos_complement")


def test_plot_series_every_slice_and_one_baseline_per_encoding():
    import math
    rows = _rows(("sorted", DIFF), ("twos sorted", TWOS),
                 ("twos stuck", TWOS.replace(stuck_slices=2, reprogram_fraction=0.5)))
    slices, series = _script().plot_series(rows)
    # differential 8-bit weights have 7 slices per array, two's complement 8: slice 7 is kept
    assert slices == list(range(TWOS.slices)) and TWOS.slices == DIFF.slices + 1
    labels = [s[0] for s in series]
    assert len(labels) == len(set(labels))
    assert labels == ["sorted", "twos sorted", "twos stuck", "baseline (differential)",
                      "baseline (twos_complement)"]
    by = {s[0]: s[1] for s in series}
    assert math.isnan(by["sorted"][7]) and by["twos sorted"][7] == rows[1][1]["per_slice"]["7"]
    for label, (_, d) in (("baseline (differential)", rows[0]),
                          ("baseline (twos_complement)", rows[1])):
        assert [v for v in by[label] if not math.isnan(v)] == list(d["baseline_per_slice"].values())
    assert [s[2] for s in series] == [False, False, False, True, True]  # hatched baselines


def test_plot_series_a_run_that_is_the_baseline_is_not_drawn_twice():
    rows = _rows(("baseline", DIFF.replace(sort="none")), ("sorted", DIFF),
                 ("twos baseline", TWOS.replace(sort="none")), ("twos sorted", TWOS))
    _, series = _script().plot_series(rows)
    assert [s[0] for s in series] == ["baseline", "sorted", "twos baseline", "twos sorted"]
    assert [s[2] for s in series] == [True, False, True, False]


def test_plot_legend_does_not_cover_the_bars():
    rows = _rows(("sorted", DIFF), ("twos sorted", TWOS))
    fig, ax = _script().draw(rows)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(r)
    axes = ax.get_window_extent(r)
    assert legend.x0 >= axes.x1  # beside the axes, not over them
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_plot_format_from_extension_and_nothing_left_on_failure(tmp_path, monkeypatch):
    from crossbar_torch.apps.cli import UsageError
    mod = _script()
    rows = _rows(("sorted", DIFF))
    mod.plot(rows, str(tmp_path / "p.svg"))
    mod.plot(rows, str(tmp_path / "p.pdf"))
    mod.plot(rows, str(tmp_path / "p.png"))
    svg = (tmp_path / "p.svg").read_text()
    assert svg.startswith("<?xml") and "<svg" in svg
    assert (tmp_path / "p.pdf").read_bytes()[:5] == b"%PDF-"
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UsageError, match="unknown image format"):
        mod.plot(rows, str(tmp_path / "p.svgx"))
    import matplotlib.figure

    def broken(self, *a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        mod.plot(rows, str(tmp_path / "q.png"))
    assert sorted(os.listdir(tmp_path)) == ["p.pdf", "p.png", "p.svg"]  # no q.png, no temp file


def test_sweep_csv_names_the_crossbar_size(tmp_path):
    import sys
    import contextlib
    import io
    from crossbar_torch.apps.cli import run_main
    sweep = tmp_path / "s.yaml"
    sweep.write_text("base: {rows: 16, cols: 32}\nruns:\n  - {name: a, sort: none}\n"
                     "  - {name: b, sort: magnitude}\n")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        run_main(_script().main, ["--model", "test_efficientnet", "--random-init", "--quiet",
                                  "--sweep", str(sweep), "--csv", str(tmp_path / "s.csv"),
                                  "--json", str(tmp_path / "s.json")])
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert [r["run"] for r in rows] == ["a", "b"]
    assert all((r["crossbar_rows"], r["crossbar_cols"]) == ("16", "32") for r in rows)
    d = json.loads((tmp_path / "s.json").read_text())
    assert list(d) == ["a", "b"] and all(v["random_weights"] for v in d.values())


def test_per_layer_csv_columns_name_what_they_hold(tmp_path):
    """weight_shape is the layer's (out, K) weight matrix; crossbar is rows x cols."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 12), torch.nn.Conv2d(3, 6, 3))
    cfg = xb.CrossbarConfig(rows=8, cols=16)
    text = xb.reprogram_report(xb.convert(model, cfg)).to_csv()
    rows = list(csv.DictReader(text.splitlines()))
    assert "rows_x_cols" not in rows[0]
    assert [r["weight_shape"] for r in rows[:-1]] == ["12x24", "6x27"]
    assert {r["crossbar"] for r in rows} == {"8x16"}


def test_random_weights_without_a_flag_are_said_in_output_and_json(tmp_path, capsys):
    from crossbar_torch.apps.cli import run_main
    run_main(_script().main, ["--model", "test_efficientnet", "--quiet", "--set", "rows=32",
                              "--json", str(tmp_path / "r.json")])
    cap = capsys.readouterr()
    assert "WARNING: --model test_efficientnet has RANDOM weights" in cap.out
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["random_weights"] is True and "RANDOM" in d["warning"]
    assert isinstance(d["weights"], int)  # the report's own field is untouched


# ------------------------------------------------- wear panels of --plot (issue 11)

def _panels(rows):
    """draw(rows) -> (fig, slices axes, histogram axes, layers axes, layers' right axis)."""
    fig, ax = _script().draw(rows)
    assert len(fig.axes) == 4 and fig.axes[0] is ax
    return (fig, *fig.axes)


def _layer_bars(lax):
    from matplotlib.patches import Rectangle
    return [p for p in lax.patches if isinstance(p, Rectangle)]


def _close(fig):
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_plot_has_slice_histogram_and_layer_panels_with_labels():
    from matplotlib.colors import to_rgba
    from matplotlib.patches import StepPatch
    rows = _rows(("baseline", DIFF.replace(sort="none")), ("sorted", DIFF),
                 ("rotated", DIFF.replace(wear_leveling="rotate_rows")))
    assert rows[2][1]["period_passes"] > 1  # an averaged (maybe fractional) run is drawn too
    fig, ax, hax, lax, twin = _panels(rows)
    assert ax.get_ylabel() == "writes per pass"
    assert hax.get_yscale() == "log" and "log scale" in hax.get_ylabel()
    assert hax.get_ylabel().startswith("worn cells")
    assert hax.get_xlabel() == "writes per pass of one cell"
    assert lax.get_ylabel().startswith("writes per pass")
    assert twin.get_ylabel().startswith("max writes of one cell per pass")
    assert lax.get_xlabel().startswith("layer") and "per pass" in lax.get_title()
    names = [l["name"] for l in rows[0][1]["layers"]]
    assert [t.get_text() for t in lax.get_xticklabels()] == names  # few layers: by name

    # one step line per run, the stored bins exactly, the run's colour of the slice panel
    stairs = [p for p in hax.patches if isinstance(p, StepPatch)]
    assert len(stairs) == len(rows)
    for (_, d), st in zip(rows, stairs):
        h = d["cell_writes_per_pass"]["histogram"]
        assert list(st.get_data().values) == h["counts"]
        assert list(st.get_data().edges) == pytest.approx(h["bin_edges"])
    # bar containers carry the run's label
    slice_colour = {c.get_label(): c.patches[0].get_facecolor() for c in ax.containers}
    for (name, d), st in zip(rows, stairs):
        assert to_rgba(st.get_edgecolor()) == to_rgba(slice_colour[name])
        # dotted vertical line at the run's max, same colour
        assert any(list(l.get_xdata()) == [d["max_cell_writes_per_pass"]] * 2
                   and l.get_linestyle() == ":" and to_rgba(l.get_color()) == st.get_edgecolor()
                   for l in hax.lines)
    labels = [t.get_text() for t in hax.get_legend().get_texts()]
    for (name, d), label in zip(rows, labels):
        assert label.startswith(name + ":")
        assert f"first failure after {d['passes_to_first_failure']:,} passes on " \
               f"{d['device']['name']}" in label
    assert "average over" in labels[2] and "average over" not in labels[1]

    # per layer: one bar per layer and run with the layer's writes; a diamond per bar with the
    # layer's max writes of one cell, on the right axis
    bars = _layer_bars(lax)
    assert len(bars) == len(names) * len(rows)
    for i, (name, d) in enumerate(rows):
        mine = bars[i * len(names):(i + 1) * len(names)]
        assert [b.get_height() for b in mine] == [l["writes_per_pass"] for l in d["layers"]]
        assert all(to_rgba(b.get_facecolor()) == to_rgba(slice_colour[name]) for b in mine)
        ys = list(twin.lines[i].get_ydata())
        assert ys == [l["max_cell_writes_per_pass"] for l in d["layers"]]
        assert list(twin.lines[i].get_xdata()) == [b.get_x() + b.get_width() / 2 for b in mine]
    _close(fig)


def test_plot_legends_hide_no_data():
    rows = _rows(("baseline", DIFF.replace(sort="none")), ("sorted", DIFF))
    fig, ax, hax, lax, twin = _panels(rows)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    hleg = hax.get_legend().get_window_extent(r)
    assert hleg.y1 <= hax.xaxis.label.get_window_extent(r).y0 + 1  # below axes and x label
    assert len(fig.legends) == 1  # the per-layer legend: the figure's, under everything
    fleg = fig.legends[0].get_window_extent(r)
    assert fleg.y1 <= min(lax.get_tightbbox(r).y0, twin.get_tightbbox(r).y0) + 1
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "baseline" in texts and "sorted" in texts
    assert any("right axis" in t for t in texts) and any("left axis" in t for t in texts)
    _close(fig)


def test_plot_six_runs_caps_the_layer_panel_at_four():
    from matplotlib.patches import StepPatch
    rows = _rows(*[(f"run {k}", DIFF.replace(seed=k)) for k in range(6)])
    fig, ax, hax, lax, twin = _panels(rows)
    layers = len(rows[0][1]["layers"])
    assert len([p for p in hax.patches if isinstance(p, StepPatch)]) == 6  # all runs here
    assert len(_layer_bars(lax)) == layers * 4
    assert [c.get_label() for c in lax.containers] == [f"run {k}" for k in range(4)]
    assert len(twin.lines) == 4
    assert "first 4 of 6 runs" in lax.get_title()
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "run 3" in legend and "run 4" not in legend
    _close(fig)


def test_plot_draws_layers_without_max_cell_counts_and_runs_without_writes(tmp_path):
    import copy
    rows = _rows(("sorted", DIFF), ("other", DIFF.replace(seed=1)))
    d = copy.deepcopy(rows[0][1])
    for l in d["layers"]:  # past the per-layer memory bound: no per-cell maximum
        l["max_cell_writes_per_pass"] = None
        l["p99_cell_writes_per_pass"] = None
    idle = copy.deepcopy(rows[1][1])  # nothing written: no worn cell, empty histogram
    idle["cell_writes_per_pass"]["histogram"] = {"bin_edges": [], "counts": []}
    idle["max_cell_writes_per_pass"] = 0
    idle["passes_to_first_failure"] = None
    for l in idle["layers"]:
        l["max_cell_writes_per_pass"] = None
    rows = [("no max", d), ("idle", idle)]
    fig, ax, hax, lax, twin = _panels(rows)
    assert len(_layer_bars(lax)) == 2 * len(d["layers"])
    assert all(all(y != y for y in line.get_ydata()) for line in twin.lines)  # no diamond
    assert any("not counted" in t.get_text() for t in lax.texts)
    labels = [t.get_text() for t in hax.get_legend().get_texts()]
    assert labels[1].startswith("idle:") and "never wears" in labels[1]
    _close(fig)
    _script().plot(rows, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_many_layers_are_numbered_not_named():
    import copy
    rows = _rows(("sorted", DIFF))
    d = copy.deepcopy(rows[0][1])
    base = d["layers"]
    d["layers"] = [dict(base[i % len(base)], name=f"layer{i}",
                        writes_per_pass=base[i % len(base)]["writes_per_pass"] * (i + 1) ** 2)
                   for i in range(45)]
    fig, ax, hax, lax, twin = _panels([("many", d)])
    assert lax.get_xlabel().startswith("layer (index in model order")
    ticks = [t.get_text() for t in lax.get_xticklabels()]
    assert 5 <= len(ticks) <= 26 and all(t.isdigit() for t in ticks) and ticks[0] == "0"
    assert len(_layer_bars(lax)) == 45
    # writes spanning orders of magnitude: a log axis, said in the label
    assert lax.get_yscale() == "log" and "log" in lax.get_ylabel()
    _close(fig)


# ------------------------------------------------- issue 20: one meaning per flag, no ignored input

def _fails(capsys, argv) -> str:
    from crossbar_torch.apps.cli import run_main
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(_script().main, argv)
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_device_is_refused_pointing_to_memristor(capsys):
    """Defect 12: --device meant the memristor preset here and the torch device elsewhere;
    --device cuda answered "--set device=cuda: unknown device" (no --set was typed)."""
    line = _fails(capsys, ["--model", "test_efficientnet", "--random-init", "--quiet",
                           "--device", "cuda"])
    assert line == ("error: --device cuda: reprogram_report.py has no torch device (it counts "
                    "writes on the CPU); the memristor device is --memristor NAME|YAML "
                    "(default, fefet, pcm, rram, or a device YAML)")
    line = _fails(capsys, ["--model", "test_efficientnet", "--random-init", "--quiet",
                           "--memristor", "memristor9000"])
    assert line.startswith("error: --memristor memristor9000: unknown device 'memristor9000'")


def test_config_with_sweep_is_refused(capsys, tmp_path):
    """Defect 9: --sweep X --config Y ignored --config without a word."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rows: 16\n")
    line = _fails(capsys, ["--model", "test_efficientnet", "--random-init", "--quiet",
                           "--sweep", os.path.join(REPO, "configs", "sweep_paper.yaml"),
                           "--config", str(cfg)])
    assert line == (f"error: --config {cfg} with --sweep: every run of a sweep has its own "
                    "configuration; put these fields in the sweep's base (or give them with "
                    "--set, which applies to every run)")


def test_random_init_is_reproducible_and_seeded(tmp_path, capsys):
    """Defect 10: two --random-init runs counted different writes (1,889,358 and 1,889,616);
    --seed (default 0) fixes the weights, as in the other scripts."""
    from crossbar_torch.apps.cli import run_main

    def writes(*extra):
        out = tmp_path / "r.json"
        run_main(_script().main, ["--model", "test_efficientnet", "--random-init", "--quiet",
                                  "--set", "rows=32", "--set", "cols=64", "--json", str(out),
                                  *extra])
        capsys.readouterr()
        return json.loads(out.read_text())["writes_per_pass"]

    torch.manual_seed(123)
    first = writes()
    torch.manual_seed(456)  # whatever the process did before
    assert writes() == first == writes("--seed", "0")
    assert writes("--seed", "1") != first
