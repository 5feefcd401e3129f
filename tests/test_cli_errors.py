"""Every script answers a user's mistake with ONE line ``error: ...`` on stderr, naming the
file / field / value, and exit status 2: never a traceback (issue 12, defects 4, 6 and 9).

Most cases call the scripts' ``main`` in this process through ``cli.run_main`` (exactly what
``python scripts/X.py`` runs), so they cost no interpreter start; a few run the real command
line to check the wiring. Every failing case fails before the model is converted or trained
(checked by timing where it matters)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO
from crossbar_torch.apps.cli import run_main, show_progress
from test_eval import SYNSETS, make_folder

SCRIPTS = os.path.join(REPO, "scripts")
TINY = ["--model", "test_efficientnet", "--img-size", "32", "--crop-pct", "1.0",
        "--workers", "0", "--batch-size", "2", "--device", "cpu"]
FT_TINY = TINY + ["--set", "rows=16", "--set", "cols=32", "--steps", "2", "--quiet"]


def script(name):
    key = f"_xb_script_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, os.path.join(SCRIPTS, f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


def fails(capsys, name, argv) -> str:
    """Run scripts/<name>.py's main through run_main; it must exit 2 with one error line.
    Returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(script(name).main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_folder(root / "train", n_good=4)
    make_folder(root / "val", n_good=3)
    (root / "empty").mkdir()
    (root / "notsyn" / "cats").mkdir(parents=True)
    (root / "bad.yaml").write_text("rows: 16\ncols: [1, 2\nsort: none\n")
    (root / "afile").write_text("not a folder\n")
    (root / "random.pt").write_bytes(os.urandom(4096))
    # a real torch.save archive, cut in half
    torch.save({"w": torch.randn(64, 64)}, root / "full.pt")
    blob = (root / "full.pt").read_bytes()
    (root / "truncated.pt").write_bytes(blob[: len(blob) // 2])
    import timm
    torch.save(timm.create_model("resnet18").state_dict(), root / "resnet18.pt")
    return root


# ---------------------------------------------------------------------------- finetune.py


@pytest.mark.parametrize("extra, expect", [
    (["--set", "nosuchfield=1"], "nosuchfield"),
    (["--set", "stuck_slices=99"], "stuck_slices=99"),
    (["--set", "rows=["], "rows=["),
    (["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    (["--lr", "-1"], "--lr"),
    (["--workers", "-2"], "--workers"),
    (["--model", "minilm"], "--train is for image models: --model minilm trains on sentences"),
    (["--model", "no_such_net"], "'no_such_net': timm has no such model"),
])
def test_finetune_bad_arguments(capsys, data, extra, expect):
    line = fails(capsys, "finetune", FT_TINY + ["--random-init", "--train", str(data / "train"),
                                                "--out", str(data / "o1")] + extra)
    assert expect in line


def test_finetune_yaml_syntax_error_names_file_and_line(capsys, data):
    line = fails(capsys, "finetune", FT_TINY + ["--random-init", "--config", str(data / "bad.yaml"),
                                                "--train", str(data / "train"),
                                                "--out", str(data / "o1")])
    assert f"{data / 'bad.yaml'}:3:" in line and "YAML syntax error" in line


@pytest.mark.parametrize("folder, expect", [
    ("missing", "no such folder"),
    ("notsyn", "'cats'"),            # names the folder that is not a synset
    ("empty", "holds no images"),
    ("afile", "is a file, not a folder"),
])
def test_finetune_bad_data_folders(capsys, data, folder, expect):
    t0 = time.perf_counter()
    line = fails(capsys, "finetune", FT_TINY + ["--random-init", "--train", str(data / folder),
                                                "--out", str(data / "o2")])
    assert expect in line and str(data / folder) in line
    assert time.perf_counter() - t0 < 20  # refused before any model is built


@pytest.mark.parametrize("ckpt, expect", [
    ("random.pt", "not a PyTorch checkpoint"),
    ("truncated.pt", "truncated"),
    ("resnet18.pt", "does not fit test_efficientnet"),
    ("nope.pt", "no such file"),
])
def test_finetune_bad_checkpoints_name_the_file(capsys, data, ckpt, expect):
    line = fails(capsys, "finetune", FT_TINY + ["--checkpoint", str(data / ckpt), "--train",
                                                str(data / "train"), "--out", str(data / "o3")])
    assert expect in line and ckpt in line
    assert "IndexError" not in line and "PytorchStreamReader" not in line


def test_wrong_architecture_message_is_short(capsys, data):
    line = fails(capsys, "finetune", FT_TINY + ["--checkpoint", str(data / "resnet18.pt"),
                                                "--train", str(data / "train"),
                                                "--out", str(data / "o3")])
    # counts and a few names, not torch's list of every missing key
    assert "missing from it" in line and "shape mismatch" in line and len(line) < 1000


def test_finetune_out_is_a_file_refused_before_work(capsys, data):
    t0 = time.perf_counter()
    line = fails(capsys, "finetune", FT_TINY + ["--random-init", "--train", str(data / "train"),
                                                "--out", str(data / "afile")])
    assert "--out" in line and "afile" in line and "is a file" in line
    assert time.perf_counter() - t0 < 20


@pytest.mark.parametrize("resume, expect", [
    ("empty", "without checkpoint-<step>.pt files"),   # a folder with no checkpoint
    ("random.pt", "not a PyTorch checkpoint"),
    ("full.pt", "not a training checkpoint"),           # a torch file, but not ours
    ("missing", "no such file or folder"),
])
def test_finetune_bad_resume(capsys, data, resume, expect):
    line = fails(capsys, "finetune", FT_TINY + ["--random-init", "--train", str(data / "train"),
                                                "--out", str(data / "o4"),
                                                "--resume", str(data / resume)])
    assert expect in line and resume in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_finetune_device_cuda_without_gpu(capsys, data):
    line = fails(capsys, "finetune", TINY + ["--random-init", "--device", "cuda", "--steps", "1",
                                             "--train", str(data / "train"),
                                             "--out", str(data / "o5")])
    assert "--device cuda" in line and "CUDA is not available" in line


def test_finetune_corrupt_image_in_a_worker(capsys, data, tmp_path):
    """A DataLoader worker meets an unreadable image: one clean line naming the file (not the
    worker's traceback inside the quotes); --skip-bad skips it, lists it once in result.json."""
    import json
    make_folder(tmp_path / "train", n_good=3)
    bad = tmp_path / "train" / SYNSETS[1] / "zz_corrupt.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    argv = (FT_TINY + ["--random-init", "--workers", "1", "--no-report", "--steps", "3",
                       "--train", str(tmp_path / "train"), "--out", str(tmp_path / "o")])
    line = fails(capsys, "finetune", argv)
    assert line.startswith(f"error: cannot read image {str(bad)!r}: ")
    assert "Caught" not in line and "--skip-bad" in line
    run_main(script("finetune").main, argv + ["--skip-bad"])
    res = json.loads((tmp_path / "o" / "result.json").read_text())
    assert [b["path"] for b in res["finetune"]["bad_images"]] == [str(bad)]
    assert res["finetune"]["steps"] == 3


# ----------------------------------------------------------------------- eval_imagenet.py


@pytest.mark.parametrize("extra, expect", [
    (["--model", "minilm"], "MiniLM is a text model"),
    (["--random-init", "--checkpoint", "x"], "not allowed with"),
    (["--checkpoint", "{data}/random.pt"], "random.pt' cannot be read"),
    (["--checkpoint", "{data}/truncated.pt"], "truncated"),
    (["--checkpoint", "{data}/resnet18.pt"], "does not fit test_efficientnet"),
    (["--random-init", "--config", "{data}/bad.yaml"], "bad.yaml:3:"),
    (["--random-init", "--out", "{data}"], "is a folder"),
    (["--random-init", "--limit", "0"], "--limit: must be >= 1"),
])
def test_eval_bad_arguments(capsys, data, extra, expect):
    extra = [a.replace("{data}", str(data)) for a in extra]
    line = fails(capsys, "eval_imagenet", TINY + ["--quiet", "--data", str(data / "val")] + extra)
    assert expect in line


def test_eval_help_does_not_offer_minilm(capsys):
    with pytest.raises(SystemExit) as e:
        script("eval_imagenet").main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "'minilm'" not in out and "MiniLM-L6 from PyPI" not in out  # --model's help


# -------------------------------------------------------------------- reprogram_report.py


@pytest.mark.parametrize("extra, expect", [
    (["--include", "nothing.like.this*"], "--include 'nothing.like.this*' matches no layer"),
    (["--include", "bn1"], "selects only layers that cannot be converted: bn1"),
    (["--plot", "{tmp}/x.svgz2"], "unknown file type .svgz2"),
    (["--plot", "{tmp}/noext"], "(no extension)"),
    (["--sweep", "{data}/bad.yaml"], "bad.yaml:3:"),
    (["--json", "{tmp}"], "is a folder"),
])
def test_report_bad_arguments(capsys, data, tmp_path, extra, expect):
    extra = [a.replace("{data}", str(data)).replace("{tmp}", str(tmp_path)) for a in extra]
    line = fails(capsys, "reprogram_report",
                 ["--model", "test_efficientnet", "--random-init", "--quiet"] + extra)
    assert expect in line
    assert os.listdir(tmp_path) == []  # nothing written, no temporary file left


def test_sweep_run_error_names_file_and_run(capsys, tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("base: {rows: 16}\nruns:\n  - {name: ok}\n  - {name: broken, sort: sideways}\n")
    line = fails(capsys, "reprogram_report", ["--model", "test_efficientnet", "--random-init",
                                              "--quiet", "--sweep", str(sweep)])
    assert f"{sweep}: run 'broken'" in line and "sideways" in line


# ------------------------------------------------------------------ the other scripts


def test_examples_and_demo_bad_arguments(capsys, data):
    assert "stuck_slices=99" in fails(capsys, "example_digits", ["--set", "stuck_slices=99"])
    assert "no such folder" in fails(capsys, "example_lite0_distill",
                                     ["--data", str(data / "missing")])
    assert "holds no val/" in fails(capsys, "example_lite0_distill", ["--data", str(data / "val")])
    assert "bad.yaml:3:" in fails(capsys, "demo", ["--stuck-config", str(data / "bad.yaml")])


@pytest.mark.parametrize("name", ["finetune", "eval_imagenet", "reprogram_report", "demo",
                                  "example_digits", "example_lite0_distill"])
def test_one_quiet_flag_name_everywhere(capsys, name):
    with pytest.raises(SystemExit) as e:
        script(name).main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--quiet" in out and "--progress" in out


def test_finetune_keeps_its_old_quiet_flag_as_an_alias():
    args = script("finetune").parse_args(["--train", "x", "--out", "y", "--no-progress"])
    assert args.quiet and not args.progress


def test_progress_bars_only_on_a_terminal(monkeypatch):
    import argparse

    class Tty:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    ns = argparse.Namespace
    monkeypatch.setattr(sys, "stderr", Tty(False))
    assert not show_progress(ns(quiet=False, progress=False))       # a log file, CI
    assert show_progress(ns(quiet=False, progress=True))            # asked for
    monkeypatch.setattr(sys, "stderr", Tty(True))
    assert show_progress(ns(quiet=False, progress=False))           # a terminal
    assert not show_progress(ns(quiet=True, progress=False))


# ------------------------------------------------------------------- the real commands


@pytest.mark.parametrize("name, argv, expect", [
    ("finetune.py", ["--random-init", "--train", "/nonexistent/x", "--out", "/tmp/x"],
     "error: --train '/nonexistent/x': no such folder"),
    ("eval_imagenet.py", ["--model", "minilm"], "error: --model minilm: MiniLM is a text model"),
    ("reprogram_report.py", ["--model", "test_efficientnet", "--random-init", "--set", "rows=0"],
     "rows=0"),
])
def test_command_line_exit_status_and_one_line(name, argv, expect):
    r = subprocess.run([sys.executable, os.path.join(SCRIPTS, name), *argv],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.stderr


# ------------------------------------------------------------- issue 20, defects 17 to 26


def test_finetune_steps_zero_is_refused_like_epochs_zero(capsys, data):
    """Defect 17: --steps 0 wrote a final.pt with "loss None -> None"."""
    from crossbar_torch.apps.finetune import FinetuneArgs
    for flag in ("--steps", "--epochs"):
        line = fails(capsys, "finetune", TINY + ["--random-init", "--train", str(data / "train"),
                                                 "--out", str(data / "o6"), flag, "0"])
        assert f"argument {flag}: must be >= 1, got 0" in line
    assert not os.path.exists(data / "o6")
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        FinetuneArgs(steps=0)


@pytest.mark.parametrize("device, expect", [
    ("gpu", "error: --device gpu: unknown device; use cpu, cuda or cuda:N"),
    ("mps", "error: --device mps: the crossbar ops run on cpu or cuda only; use cpu, cuda or "
            "cuda:N"),
])
@pytest.mark.parametrize("name", ["eval_imagenet", "finetune"])
def test_an_unknown_torch_device_is_one_line(capsys, data, name, device, expect):
    """Defect 18: --device gpu / mps gave a traceback (frontier.py: tests/test_frontier.py)."""
    argv = [a for a in TINY if a not in ("--device", "cpu")] + ["--random-init",
                                                                "--device", device]
    argv += (["--data", str(data / "val")] if name == "eval_imagenet" else
             ["--train", str(data / "train"), "--out", str(data / "o7"), "--steps", "1"])
    assert fails(capsys, name, argv) == expect


@pytest.mark.parametrize("name", ["eval_imagenet", "reprogram_report"])
def test_an_unknown_timm_weight_tag_is_one_line(capsys, data, name):
    """Defect 18: --model resnet18.not_a_tag gave timm's traceback."""
    argv = ["--model", "resnet18.not_a_tag", "--random-init", "--quiet"]
    assert fails(capsys, name, argv) == (
        "error: --model 'resnet18.not_a_tag': timm's resnet18 has no weight tag 'not_a_tag' "
        "(tags: a1_in1k, a2_in1k, a3_in1k, fb_ssl_yfcc100m_ft_in1k, fb_swsl_ig1b_ft_in1k, "
        "gluon_in1k, tv_in1k)")


def test_include_and_exclude_of_the_same_layers(capsys):
    """Defect 21: "--include X (without --exclude X) selects no layer" read as a contradiction."""
    import fnmatch

    import timm
    n = sum(fnmatch.fnmatchcase(name, "blocks.*")
            for name, _ in timm.create_model("test_efficientnet").named_modules())
    line = fails(capsys, "reprogram_report", ["--model", "test_efficientnet", "--random-init",
                                              "--quiet", "--include", "blocks.*",
                                              "--exclude", "blocks.*"])
    assert line == (f"error: no layer was converted: --exclude blocks.* removes every one of "
                    f"the {n} module(s) --include blocks.* selects")
    line = fails(capsys, "reprogram_report", ["--model", "test_efficientnet", "--random-init",
                                              "--quiet", "--exclude", "*"])
    assert line.startswith("error: no layer was converted: --exclude * removes every one of "
                           "the ") and line.endswith(" module(s) of the model")
