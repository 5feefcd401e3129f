"""A sweep of bad inputs over every flag of every script (issue 20, "Done when"): each case runs
the script's ``main`` through ``cli.run_main`` (what ``python scripts/X.py`` runs) in a process
of its own, with one bad value, and must end with exit status 2 and exactly one stderr line,
``error: ...``, naming the flag or the file; never a traceback, never a run that goes ahead.

Cost: one interpreter per script imports torch and the script once, then forks one child per
case (fork, not exec: the import is paid once); the six scripts run in parallel. Most cases end
in argument checking (under a second); those that need the model or the config take a few
seconds, so the sweep takes minutes on a loaded 2-core machine: marked slow. Every option of each script's parser must be covered by a case (checked), so
a new flag without a bad-input case fails here. Run one script's sweep by hand with
``python tests/test_bad_inputs.py eval_imagenet`` (prints one JSON line per case).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SCRIPTS = ("eval_imagenet", "finetune", "frontier", "reprogram_report", "plot_periphery", "demo",
           "allocate")
CASE_TIMEOUT = 120  # seconds; a case that runs on (the bad value was not refused) is killed

IMAGE = ["--model", "test_efficientnet", "--img-size", "32", "--crop-pct", "1.0",
         "--workers", "0", "--device", "cpu", "--quiet"]


def image_cases(tmp: str) -> list:
    """Model, preprocessing, device and progress flags, shared by the image scripts."""
    return [
        ("--model", ["--model", "no_such_net"], "--model 'no_such_net'"),
        ("--model", ["--model", "resnet18.not_a_tag"], "no weight tag 'not_a_tag'"),
        ("--checkpoint", ["!--random-init", "--checkpoint", f"{tmp}/missing.pt"], "--checkpoint"),
        ("--checkpoint", ["!--random-init", "--checkpoint", f"{tmp}/noise.pt"], "noise.pt"),
        ("--pretrained", ["--pretrained"], "--pretrained"),
        ("--pypi-weights", ["!--random-init", "--pypi-weights"], "--pypi-weights"),
        ("--random-init", ["--random-init=yes"], "--random-init"),
        ("--mean", ["--mean", "0.5", "0.5", "x"], "--mean"),
        ("--mean", ["--mean", "0.5", "0.5"], "--mean"),
        ("--std", ["--std", "0", "1", "1"], "--std"),
        ("--interpolation", ["--interpolation", "cubic"], "--interpolation"),
        ("--crop-pct", ["--crop-pct", "2"], "--crop-pct"),
        ("--crop-pct", ["--crop-pct", "x"], "--crop-pct"),
        ("--img-size", ["--img-size", "0"], "--img-size"),
        ("--device", ["--device", "gpu"], "--device gpu"),
        ("--device", ["--device", "mps"], "--device mps"),
        ("--device", ["--device", "cuda:x"], "--device cuda:x"),
        ("--seed", ["--seed", "x"], "--seed"),
        ("--quiet", ["--quiet=yes"], "--quiet"),
        ("--progress", ["--progress"], "--progress"),
    ]


def config_cases(tmp: str) -> list:
    return [
        ("--config", ["--config", f"{tmp}/missing.yaml"], "--config"),
        ("--config", ["--config", f"{tmp}/bad.yaml"], "bad.yaml:3:"),
        ("--config", ["--config", f"{tmp}/sweep.yaml"], "sweep.yaml"),
        ("--set", ["--set", "nosuchfield=1"], "nosuchfield"),
        ("--set", ["--set", "stuck_slices=99"], "stuck_slices=99"),
        ("--set", ["--set", "rows"], "rows"),
        ("--set", ["--set", "input_bits=seven"], "input_bits"),
    ]


def cases(script: str, tmp: str):
    """(base argv, [(flag, argv, expected text in the error line), ...]). An argv item
    ``!--FLAG`` takes --FLAG (and its value) out of the base; ``!POS`` its positionals."""
    data = f"{tmp}/data"
    if script == "eval_imagenet":
        base = IMAGE + ["--random-init", "--batch-size", "2", "--limit", "1"]
        return base, image_cases(tmp) + config_cases(tmp) + [
            ("--data", ["--data", f"{tmp}/missing"], "--data"),
            ("--data", ["--data", f"{tmp}/afile"], "--data"),
            ("--data", ["--data", f"{tmp}/empty"], "empty"),
            ("--limit", ["--limit", "0"], "--limit"),
            ("--batch-size", ["--batch-size", "0"], "--batch-size"),
            ("--calib-images", ["--calib-images", "0"], "--calib-images"),
            ("--workers", ["--workers", "-1"], "--workers"),
            ("--skip-bad", ["--skip-bad=1"], "--skip-bad"),
            ("--out", ["--out", tmp], "--out"),
            ("--out", ["--out", f"{tmp}/afile/x.json"], "--out"),
        ]
    if script == "finetune":
        base = IMAGE + ["--random-init", "--batch-size", "2", "--steps", "1", "--no-report",
                        "--train", f"{data}/train", "--out", f"{tmp}/ft"]
        return base, image_cases(tmp) + config_cases(tmp) + [
            ("--train", ["--train", f"{tmp}/missing"], "--train"),
            ("--train", ["--train", f"{tmp}/empty"], "empty"),
            ("--distill-images", ["!--train", "--distill-images", f"{tmp}/missing"],
             "--distill-images"),
            ("--val", ["--val", f"{tmp}/missing"], "--val"),
            ("--workers", ["--workers", "-1"], "--workers"),
            ("--skip-bad", ["--skip-bad=1"], "--skip-bad"),
            ("--calib-images", ["--calib-images", "0"], "--calib-images"),
            ("--scale", ["--scale", "0.5", "0.1"], "--scale"),
            ("--hflip", ["--hflip", "2"], "--hflip"),
            ("--aa", ["--aa", "not-a-policy"], "--aa"),
            ("--color-jitter", ["--color-jitter", "-1"], "--color-jitter"),
            ("--loss", ["--loss", "l2"], "--loss"),
            ("--loss", ["--loss", "ce", "!--train", "--distill-images", f"{data}/train"], "--loss"),
            ("--temperature", ["--temperature", "0"], "--temperature"),
            ("--alpha", ["--alpha", "2"], "--alpha"),
            ("--epochs", ["--epochs", "0"], "--epochs"),
            ("--steps", ["--steps", "0"], "--steps"),
            ("--batch-size", ["--batch-size", "0"], "--batch-size"),
            ("--lr", ["--lr", "0"], "--lr"),
            ("--opt", ["--opt", "not_an_optimizer"], "--opt"),
            ("--momentum", ["--momentum", "x"], "--momentum"),
            ("--momentum", ["--momentum", "-1", "--opt", "sgd"], "--momentum"),
            ("--sched", ["--sched", "step"], "--sched"),
            ("--warmup-steps", ["--warmup-steps", "-1"], "--warmup-steps"),
            ("--weight-decay", ["--weight-decay", "-1"], "--weight-decay"),
            ("--grad-clip", ["--grad-clip", "0"], "--grad-clip"),
            ("--label-smoothing", ["--label-smoothing", "1"], "--label-smoothing"),
            ("--train-bn", ["--train-bn=1"], "--train-bn"),
            ("--amp", ["--amp=1"], "--amp"),
            ("--out", ["--out", f"{tmp}/afile"], "--out"),
            ("--save-every", ["--save-every", "-1"], "--save-every"),
            ("--keep", ["--keep", "-1"], "--keep"),
            ("--resume", ["--resume", f"{tmp}/missing.pt"], "--resume"),
            ("--resume", ["--resume", f"{tmp}/noise.pt"], "noise.pt"),
            ("--resume", ["--resume", f"{tmp}/empty"], "--resume"),
            ("--no-report", ["--no-report=1"], "--no-report"),
            ("--no-progress", ["--no-progress=1"], "--no-progress"),
            ("--sentences", ["--sentences", f"{tmp}/missing.txt"], "--sentences"),
            ("--calibration", ["--calibration", "generated"], "--calibration is for sentence"),
            ("--freeze-crossbar", ["--freeze-crossbar=1"], "--freeze-crossbar"),
            ("--reprogram-every", ["--reprogram-every", "-1"], "--reprogram-every"),
            ("--reprogram-every", ["--reprogram-every", "2", "--resume", f"{tmp}/missing.pt"],
             "--resume with --reprogram-every"),
        ]
    if script == "frontier":
        base = IMAGE + ["--random-init", "--batch-size", "2", "--data", f"{data}/val",
                        "--sweep", f"{tmp}/sweep.yaml", "--csv", f"{tmp}/fr/f.csv"]
        return base, image_cases(tmp) + [
            ("--sweep", ["--sweep", f"{tmp}/missing.yaml"], "missing.yaml"),
            ("--sweep", ["--sweep", f"{tmp}/bad.yaml"], "bad.yaml"),
            ("--sweep", ["--sweep", f"{tmp}/sweep_extra.yaml"],
             "sweep_extra.yaml: unknown top-level key(s) ['extra']"),
            ("--sweep", ["--sweep", f"{tmp}/sweep.yaml", f"{tmp}/sweep.yaml"],
             "appears twice in"),
            ("--set", ["--set", "nosuchfield=1"], "nosuchfield"),
            ("--set", ["--set", "pool=0"], "pool=0"),
            ("--only", ["--only", "nope*"], "nope*"),
            ("--data", ["--data", f"{tmp}/missing"], "--data"),
            ("--data", ["!--data"], "--data"),
            ("--limit", ["--limit", "0"], "--limit"),
            ("--batch-size", ["--batch-size", "0"], "--batch-size"),
            ("--workers", ["--workers", "-1"], "--workers"),
            ("--skip-bad", ["--skip-bad=1"], "--skip-bad"),
            ("--calib-images", ["--calib-images", "0"], "--calib-images"),
            ("--cache-images", ["--cache-images", "-1"], "--cache-images"),
            ("--sentences", ["--sentences", f"{tmp}/missing.txt"], "--sentences"),
            ("--generated", ["--generated", "300"], "--generated"),
            ("--calibration", ["--calibration", f"{tmp}/missing.txt"], "--calibration"),
            ("--csv", ["--csv", tmp], "--csv"),
            ("--json", ["--json", tmp], "--json"),
            ("--png", ["--png", f"{tmp}/out.txt"], "--png"),
            ("--no-png", ["--no-png=1"], "--no-png"),
            ("--no-float-cache", ["--no-float-cache=1"], "--no-float-cache"),
        ]
    if script == "reprogram_report":
        base = ["--model", "test_efficientnet", "--random-init", "--quiet"]
        img = [c for c in image_cases(tmp) if c[0] in (
            "--model", "--checkpoint", "--pretrained", "--pypi-weights", "--random-init",
            "--quiet", "--progress", "--seed")]
        return base, img + config_cases(tmp) + [
            ("--sweep", ["--sweep", f"{tmp}/missing.yaml"], "missing.yaml"),
            ("--sweep", ["--sweep", f"{tmp}/bad.yaml"], "bad.yaml:3:"),
            ("--sweep", ["--sweep", f"{tmp}/sweep_extra.yaml"],
             "sweep_extra.yaml: unknown top-level key(s) ['extra']"),
            ("--sweep", ["--sweep", f"{tmp}/config.yaml", f"{tmp}/sub/config.yaml"],
             "appears in both"),
            ("--include", ["--include", "nope*"], "--include 'nope*'"),
            ("--exclude", ["--exclude", "nope*"], "--exclude 'nope*'"),
            ("--exclude", ["--exclude", "*"], "--exclude *"),
            ("--json", ["--json", tmp], "--json"),
            ("--csv", ["--csv", tmp], "--csv"),
            ("--plot", ["--plot", f"{tmp}/x.notaformat"], "--plot"),
            ("--layers", ["--layers=1"], "--layers"),
            ("--memristor", ["--memristor", "no_such_device"], "no_such_device"),
            ("--memristor", ["--memristor", f"{tmp}/bad.yaml"], "bad.yaml"),
            ("--device", ["--device", "no_such_device"], "--device"),
            ("--calibration", ["--calibration", "generated"], "--calibration is for sentence"),
            ("--calibration", ["--model", "minilm", "--calibration", f"{tmp}/missing.txt"],
             "missing.txt"),
            ("--calibration", ["--model", "minilm", "--calibration", "corpus:9"],
             "--calibration corpus:9: calibration: 'corpus:9': the corpus holds 3 draws"),
            ("--calib-sentences", ["--calib-sentences", "0"], "--calib-sentences"),
            ("--calib-sentences", ["--model", "minilm", "--calib-sentences", "5000"],
             "--calib-sentences 5000: calibration: 5000 sentences asked, 'corpus' holds 768"),
        ]
    if script == "plot_periphery":
        base = [f"{tmp}/periphery.csv", f"{tmp}/p.png"]
        return base, [
            ("csv", [f"{tmp}/missing.csv", f"{tmp}/p.png", "!POS"], "missing.csv"),
            ("csv", [f"{tmp}/latin1.csv", f"{tmp}/p.png", "!POS"], "latin1.csv"),
            ("csv", [f"{tmp}/bad.yaml", f"{tmp}/p.png", "!POS"], "bad.yaml"),
            ("png", [f"{tmp}/periphery.csv", tmp, "!POS"], tmp),
            ("png", [f"{tmp}/periphery.csv", f"{tmp}/p.notaformat", "!POS"], "p.notaformat"),
            ("--title", ["--title"], "--title"),
        ]
    if script == "demo":
        return ["--quiet"], [
            ("--stuck-config", ["--stuck-config", f"{tmp}/missing.yaml"], "missing.yaml"),
            ("--stuck-config", ["--stuck-config", f"{tmp}/bad.yaml"], "bad.yaml:3:"),
            ("--best-config", ["--best-config", f"{tmp}/missing.yaml"], "missing.yaml"),
            ("--best-config", ["--best-config", f"{tmp}/bad.yaml"], "bad.yaml:3:"),
            ("--quiet", ["--quiet=yes"], "--quiet"),
            ("--progress", ["--progress"], "--progress"),
        ]
    if script == "allocate":
        with open(f"{tmp}/cand_field.yaml", "w") as f:
            f.write("- {rows: 3}\n")
        with open(f"{tmp}/cand_value.yaml", "w") as f:
            f.write("- {stuck_slices: 99}\n")
        return ["--out", f"{tmp}/policy.yaml", "--quiet"], [
            ("--model", ["--model", "resnet50"], "--model"),
            ("--config", ["--config", f"{tmp}/missing.yaml"], "--config"),
            ("--candidates", ["--candidates", f"{tmp}/missing.yaml"], "--candidates"),
            ("--candidates", ["--candidates", f"{tmp}/cand_field.yaml"], "['rows']"),
            ("--candidates", ["--candidates", f"{tmp}/cand_value.yaml"], "stuck_slices=99"),
            ("--budget-like", ["--budget-like", "7"], "--budget-like"),
            ("--budget-factor", ["--budget-factor", "0"], "--budget-factor"),
            ("--calib-sentences", ["--calib-sentences", "0"], "--calib-sentences"),
            ("--calib-sentences", ["--calib-sentences", "900"], "'corpus' holds 768"),
            ("--calibration", ["--calibration", f"{tmp}/missing.txt"], "--calibration"),
            ("--calibration", ["--calibration", f"{tmp}/empty.txt"], "empty.txt"),
            ("--calibration", ["--calibration", "corpus:two"], "corpus:K with K a whole number"),
            ("--sensitivity", ["--sensitivity", "loss"], "--sensitivity"),
            ("--gain-sentences", ["--gain-sentences", "0"], "--gain-sentences"),
            ("--out", ["--out", f"{tmp}/policy.txt"], "--out"),
            ("--quiet", ["--quiet=yes"], "--quiet"),
            ("--progress", ["--progress"], "--progress"),
        ]
    raise KeyError(script)


def argv_of(base: list, extra: list, flags_with_value: set) -> list:
    """The base with the ``!--FLAG`` items of ``extra`` taken out (``!POS``: every
    positional), then the rest of ``extra``."""
    drop = {a[1:] for a in extra if a.startswith("!")}
    out, i = [], 0
    if "POS" in drop:
        base = [a for a in base if a.startswith("-")]
    while i < len(base):
        a = base[i]
        if a in drop:
            i += 2 if a in flags_with_value else 1
            continue
        out.append(a)
        i += 1
    return out + [a for a in extra if not a.startswith("!")]


def make_fixtures(tmp: str) -> None:
    import torch
    sys.path.insert(0, HERE)
    from test_eval import make_folder
    from pathlib import Path
    t = Path(tmp)
    make_folder(t / "data" / "train", n_good=4)
    make_folder(t / "data" / "val", n_good=3)
    (t / "empty").mkdir()
    (t / "afile").write_text("not a folder\n")
    (t / "empty.txt").write_text("\n\n")  # no sentence
    (t / "bad.yaml").write_text("rows: 16\ncols: [1, 2\nsort: none\n")
    (t / "config.yaml").write_text("rows: 16\ncols: 32\n")
    (t / "sweep.yaml").write_text("base: {rows: 16, cols: 32}\nruns:\n  - {name: crossbar8}\n")
    (t / "sweep_extra.yaml").write_text("base: {rows: 16, cols: 32}\nruns:\n  - {name: a}\n"
                                        "extra: 1\n")
    (t / "sub").mkdir()
    (t / "sub" / "config.yaml").write_text("rows: 16\ncols: 32\nsort: none\n")
    (t / "noise.pt").write_bytes(os.urandom(2048))
    (t / "latin1.csv").write_bytes(b"name,top1\ncrossbar8,90\n\xff\xfe,1\n")
    (t / "periphery.csv").write_text("name,top1,sort,input_bits,adc_bits,prog_noise\n"
                                     "crossbar8,90,none,,,\nadc6,88,none,8,6,\n")
    del torch


# --------------------------------------------------------------------------- the runner


def _parser_flags(mod) -> tuple:
    """(long option strings, those that take a value, positional names) of the script's
    parser, caught at its parse_args (nothing else runs)."""
    import argparse

    class Caught(Exception):
        pass

    def grab(self, args=None, namespace=None):
        raise Caught(self)
    orig = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = grab
    try:
        mod.main([])
    except Caught as e:
        parser = e.args[0]
    finally:
        argparse.ArgumentParser.parse_args = orig
    flags, valued, positional = [], [], []
    for a in parser._actions:
        longs = [s for s in a.option_strings if s.startswith("--")]
        if not a.option_strings:
            positional.append(a.dest)
        flags += [s for s in longs if s != "--help"]
        if a.nargs != 0:
            valued += longs
    return flags, valued, positional


def _run_case(mod, argv: list) -> dict:
    """Fork; the child runs the script's main through run_main with stdout and stderr in
    files; returns {rc, err, seconds}."""
    import time

    from crossbar_torch.apps.cli import run_main
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.argv = [f"{mod.SCRIPT_NAME}.py"] + list(argv)  # the usage line's prog
                try:
                    run_main(mod.main, argv)
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else 1
                except BaseException:
                    import traceback
                    traceback.print_exc()
                    code = 1
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        deadline = t0 + CASE_TIMEOUT
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rc = os.waitstatus_to_exitcode(status)
                break
            if time.perf_counter() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                rc = "timeout"
                break
            time.sleep(0.01)
        err.seek(0)
        return {"rc": rc, "err": err.read().decode(errors="replace"),
                "seconds": round(time.perf_counter() - t0, 2)}


def run_sweep(script: str, tmp: str) -> dict:
    """Every case of ``script``: {"flags": ..., "results": [{flag, argv, expect, rc, err}]}."""
    import importlib.util
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    # imported once here (no torch op runs before the forks), not once per case
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import PIL.Image  # noqa: F401
    import timm  # noqa: F401
    import timm.data  # noqa: F401
    import yaml  # noqa: F401

    import crossbar_torch.apps.data  # noqa: F401
    import crossbar_torch.apps.models  # noqa: F401
    timm.list_models("resnet18*")  # timm's registry, built once
    spec = importlib.util.spec_from_file_location(f"_xb_bad_{script}",
                                                  os.path.join(REPO, "scripts", f"{script}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.SCRIPT_NAME = script
    flags, valued, positional = _parser_flags(mod)
    base, todo = cases(script, tmp)
    results = []
    for flag, extra, expect in todo:
        argv = argv_of(base, extra, set(valued))
        results.append({"flag": flag, "argv": argv, "expect": expect,
                        **_run_case(mod, argv)})
    return {"flags": flags, "positional": positional, "results": results}


# --------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """All six sweeps, started together (two cores: they overlap their imports and waits)."""
    tmp = str(tmp_path_factory.mktemp("bad"))
    make_fixtures(tmp)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = {s: subprocess.Popen([sys.executable, __file__, s, tmp], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
             for s in SCRIPTS}
    out = {}
    for s, p in procs.items():
        stdout, stderr = p.communicate(timeout=1800)
        assert p.returncode == 0, stderr[-3000:]
        out[s] = json.loads(stdout.strip().splitlines()[-1])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_a_bad_input_case(sweeps, script):
    s = sweeps[script]
    covered = {r["flag"] for r in s["results"]}
    missing = sorted(set(s["flags"]) - covered) + sorted(set(s["positional"]) - covered)
    assert not missing, f"{script}: flags without a bad-input case: {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_inputs_are_one_error_line(sweeps, script):
    bad = []
    for r in sweeps[script]["results"]:
        lines = [line for line in r["err"].splitlines() if line.strip()]
        ok = (r["rc"] == 2 and len(lines) == 1 and lines[0].startswith("error: ")
              and "Traceback" not in r["err"] and r["expect"] in lines[0])
        if not ok:
            bad.append(f"{r['flag']} {r['argv']} -> rc {r['rc']} ({r['seconds']} s): "
                       f"{r['err'][-600:]!r} (expected one line with {r['expect']!r})")
    assert not bad, f"{script}: {len(bad)} case(s):\n" + "\n".join(bad)


if __name__ == "__main__":
    script = sys.argv[1]
    tmp = sys.argv[2] if len(sys.argv) > 2 else None
    if tmp is None:
        tmp = tempfile.mkdtemp(prefix="bad_inputs_")
        make_fixtures(tmp)
    res = run_sweep(script, tmp)
    if len(sys.argv) <= 2:
        for r in res["results"]:
            print(json.dumps(r))
    print(json.dumps(res))
