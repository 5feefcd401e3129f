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
    from crossbar_torch.cli import UsageError
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"name,top1\ncrossbar8,90\n\xff\xfe,1\n")
    with pytest.raises(UsageError) as e:
        plot_periphery.read_rows(str(path))
    assert str(e.value) == (f"{path}: not a UTF-8 text CSV (byte 0xff at offset 23); give the "
                            "CSV scripts/frontier.py wrote")
