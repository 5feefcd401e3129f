"""One sweep loader, one set of rules (issue 17): crossbar_torch/apps/sweep.py, as
scripts/reprogram_report.py and scripts/frontier.py both read it. Each rule is checked through
both scripts' ``main`` (run as ``python scripts/X.py`` runs it: ``cli.run_main``), stopping at
the sweep (a mistake), or just after it (``--only`` names the runs frontier read)."""
from __future__ import annotations

import os

import pytest

import crossbar_torch as xb
from crossbar_torch.apps import cli_frontier, cli_report
from crossbar_torch.apps.cli import run_main
from crossbar_torch.apps.sweep import SweepError, load_sweep

SCRIPTS = ("report", "frontier")


def call(script, sweeps, tmp_path, extra=()):
    """(exit status, stderr lines) of the script with ``--sweep sweeps``."""
    if script == "report":
        argv = ["--model", "test_efficientnet", "--random-init", "--quiet",
                "--sweep", *sweeps, *extra]
        main = cli_report.main
    else:
        argv = ["--model", "test_efficientnet", "--random-init", "--quiet", "--device", "cpu",
                "--data", str(tmp_path), "--csv", str(tmp_path / "f.csv"),
                "--sweep", *sweeps, *extra]
        main = cli_frontier.main
    try:
        run_main(main, argv)
    except SystemExit as e:
        return e.code
    return 0


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def one_error(capsys):
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_top_level_key_is_refused_naming_key_and_file(script, tmp_path, capsys):
    s = write(tmp_path / "s.yaml", "base: {rows: 16}\nruns:\n  - {name: a}\nrun: [x]\n")
    assert call(script, [s], tmp_path) == 2
    assert one_error(capsys) == (f"error: {s}: unknown top-level key(s) ['run']; a sweep holds "
                                 "only 'base' and 'runs'")


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("where,text", [
    ("base", "base: {rows: 16, colz: 8}\nruns:\n  - {name: a}\n"),
    ("run", "runs:\n  - {name: a, colz: 8}\n"),
    ("plain", "rows: 16\ncolz: 8\n"),
])
def test_unknown_field_is_refused_naming_field_and_file(script, where, text, tmp_path, capsys):
    s = write(tmp_path / "s.yaml", text)
    assert call(script, [s], tmp_path) == 2
    line = one_error(capsys)
    what = {"base": "base", "run": "run 'a'", "plain": "config"}[where]
    assert line.startswith(f"error: {s}: {what}: unknown CrossbarConfig field(s) ['colz']")


@pytest.mark.parametrize("script", SCRIPTS)
def test_duplicate_name_across_files_is_refused_naming_both(script, tmp_path, capsys):
    a = write(tmp_path / "a.yaml", "runs:\n  - {name: x, sort: none}\n")
    b = write(tmp_path / "b.yaml", "runs:\n  - {name: y}\n  - {name: x, sort: magnitude}\n")
    assert call(script, [a, b], tmp_path) == 2
    assert one_error(capsys) == (f"error: run name 'x' appears in both {a} and {b}; names key "
                                 "the rows of the results: make them unique")


@pytest.mark.parametrize("script", SCRIPTS)
def test_duplicate_name_in_one_file_is_refused(script, tmp_path, capsys):
    a = write(tmp_path / "a.yaml", "runs:\n  - {name: x}\n  - {name: 'x '}\n")
    assert call(script, [a], tmp_path) == 2
    assert f"error: run name 'x' appears twice in {a};" in one_error(capsys)


@pytest.mark.parametrize("script", SCRIPTS)
def test_plain_configs_of_the_same_name_are_refused(script, tmp_path, capsys):
    a = write(tmp_path / "one" / "p.yaml", "rows: 16\n")
    b = write(tmp_path / "two" / "p.yaml", "rows: 32\n")
    assert call(script, [a, b], tmp_path) == 2
    assert f"run name 'p' appears in both {a} and {b}" in one_error(capsys)


def test_frontier_takes_a_plain_config_as_a_one_run_sweep(tmp_path, capsys):
    """--only names the runs read (and stops there, before any data is needed)."""
    p = write(tmp_path / "mild.yaml", "rows: 16\ncols: 32\nstuck_slices: 2\n")
    q = write(tmp_path / "q.yaml", "crossbar: {rows: 16, cols: 32, sort: none}\n")
    assert call("frontier", [p, q], tmp_path, ["--only", "nope"]) == 2
    assert one_error(capsys).endswith("matches no run of the sweep (runs: crossbar8, mild, q)")
    import crossbar_torch.apps.frontier as fr
    runs = fr.load_sweeps([p, q], ["seed=3"])
    mild = xb.CrossbarConfig(rows=16, cols=32, stuck_slices=2, seed=3)
    assert [r.name for r in runs] == ["crossbar8", "mild", "q"]
    assert runs[1].config == mild
    assert runs[2].config == xb.CrossbarConfig(rows=16, cols=32, sort="none", seed=3)
    assert runs[0].config == fr.reference_config(mild)  # the first file is the base


def test_report_takes_a_plain_config_as_a_one_run_sweep(tmp_path, capsys):
    import json
    p = write(tmp_path / "mild.yaml", "rows: 16\ncols: 32\nstuck_slices: 2\n")
    s = write(tmp_path / "s.yaml", "base: {rows: 16, cols: 32}\nruns:\n  - {name: plain}\n")
    out = tmp_path / "r.json"
    assert call("report", [p, s], tmp_path, ["--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert list(d) == ["mild", "plain"]
    assert xb.CrossbarConfig.from_dict(d["mild"]["config"]) == \
        xb.CrossbarConfig(rows=16, cols=32, stuck_slices=2)
    assert xb.CrossbarConfig.from_dict(d["plain"]["config"]) == xb.CrossbarConfig(rows=16, cols=32)


@pytest.mark.parametrize("text,needle", [
    ("", "the file is empty"),
    ("- rows: 16\n", "got a list"),
    ("base: {rows: 16}\n", "has 'base' but no 'runs'"),
    ("runs: []\n", "'runs' must be a non-empty list"),
    ("runs:\n  - {sort: none}\n", "runs[0] has no 'name'"),
    ("runs:\n  - {name: ''}\n", "runs[0]: name '' must be a non-empty string"),
    ("crossbar: {rows: 16}\nother: 1\n", "unknown key(s) ['other'] beside 'crossbar'"),
    ("runs:\n  - {name: a, device: no_such_device}\n", "run 'a':"),
])
def test_other_rules(text, needle, tmp_path):
    s = write(tmp_path / "s.yaml", text)
    with pytest.raises(SweepError) as e:
        load_sweep([s])
    assert str(e.value).startswith(f"{s}") and needle in str(e.value)


def test_runs_are_base_then_run_then_set(tmp_path):
    s = write(tmp_path / "s.yaml", "base: {rows: 16, cols: 32, sort: none}\nruns:\n"
                                   "  - {name: a}\n  - {name: 7, sort: magnitude, rows: 64}\n")
    runs = load_sweep([s], ["cols=64"])
    assert [(r.name, r.source) for r in runs] == [("a", s), ("7", s)]
    assert runs[0].config == xb.CrossbarConfig(rows=16, cols=64, sort="none")
    assert runs[1].config == xb.CrossbarConfig(rows=64, cols=64, sort="magnitude")
    assert runs[1].fields == {"rows": 64, "cols": 32, "sort": "magnitude"}  # as written
    with pytest.raises(SweepError, match=r"^--set stuck_slices=99: makes base of .*s.yaml "
                                         "invalid"):
        load_sweep([s], ["stuck_slices=99"])


def test_every_shipped_sweep_loads():
    from conftest import REPO
    cfgs = os.path.join(REPO, "configs")
    names = sorted(f for f in os.listdir(cfgs) if f.startswith("sweep_") and f.endswith(".yaml"))
    assert names
    for f in names:
        assert load_sweep([os.path.join(cfgs, f)])
