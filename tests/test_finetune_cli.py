"""scripts/finetune.py end to end on a generated labeled folder with a tiny timm model: trains,
checkpoints atomically, resumes to bit-identical weights, and its final.pt evaluates with
scripts/eval_imagenet.py --checkpoint. Its answers to a resume with other arguments."""
import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from crossbar_torch.apps.cli import run_main
from test_eval import make_folder

FT = os.path.join(REPO, "scripts", "finetune.py")
EVAL = os.path.join(REPO, "scripts", "eval_imagenet.py")
COMMON = ["--model", "test_efficientnet", "--random-init", "--img-size", "32", "--crop-pct", "1.0",
          "--workers", "0", "--batch-size", "2", "--set", "rows=16", "--set", "cols=32",
          "--set", "stuck_slices=3", "--set", "reprogram_fraction=0.25", "--seed", "0",
          "--device", "cpu", "--lr", "0.01", "--steps", "4", "--save-every", "2", "--quiet"]


def run(script, args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                       cwd=REPO, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_finetune_cli_resume_and_eval(tmp_path, monkeypatch):
    # a dataset root holding train/ and val/, as eval_imagenet.py --data accepts it
    make_folder(tmp_path / "data" / "train", n_good=8)
    make_folder(tmp_path / "data" / "val", n_good=5)
    data = str(tmp_path / "data")
    a, b = tmp_path / "a", tmp_path / "b"
    ra = run(FT, COMMON + ["--train", data, "--val", data, "--out", str(a)])
    assert f"--val: using {os.path.join(data, 'val')}" in ra.stdout
    assert ra.stdout.count("tile order (ids") == 1  # the per-layer table once, after training
    assert sorted(p for p in os.listdir(a) if p.startswith("checkpoint-")) == [
        "checkpoint-0000002.pt", "checkpoint-0000004.pt"]
    assert not [p for p in os.listdir(a) if p.startswith(".tmp")]  # nothing half-written
    # resume from step 2 into another folder: same final weights, bit for bit
    rb = run(FT, COMMON + ["--train", data, "--val", data, "--out", str(b),
                           "--resume", str(a / "checkpoint-0000002.pt")])
    assert "resumed from step 2 of 4" in rb.stdout
    fa = torch.load(a / "final.pt", weights_only=True)
    fb = torch.load(b / "final.pt", weights_only=True)
    assert fa["crossbar_config"]["stuck_slices"] == 3
    assert fa["model"].keys() == fb["model"].keys()
    for k, va in fa["model"].items():
        vb = fb["model"][k]
        assert (torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb), k
    # and training really moved the weights between step 2 and the end (the check can fail)
    mid = torch.load(a / "checkpoint-0000002.pt", weights_only=False)
    mid_sd = mid.get("model", mid)
    moved = [k for k, v in fa["model"].items() if k.endswith("weight")
             and isinstance(v, torch.Tensor) and k in mid_sd and not torch.equal(v, mid_sd[k])]
    assert moved
    result = json.loads((a / "result.json").read_text())
    assert result["random_weights"] is True and "RANDOM" in result["weights"]
    rb_result = json.loads((b / "result.json").read_text())
    assert rb_result["finetune"]["resumed_from"]["step"] == 2
    assert rb_result["args_used"]["lr"] == 0.01
    # the final checkpoint evaluates with the evaluation script
    out = tmp_path / "eval.json"
    run(EVAL, ["--model", "test_efficientnet", "--img-size", "32", "--crop-pct", "1.0",
               "--workers", "0", "--quiet", "--checkpoint", str(a / "final.pt"),
               "--data", data, "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["images"] == 5 and res["config"]["stuck_slices"] == 3

    # a resume that cannot tell the truth is refused, naming what differs (in this process:
    # the script's main through run_main, as `python scripts/finetune.py` runs it)
    spec = importlib.util.spec_from_file_location("_xb_ft_cli", FT)
    ft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ft)

    def refused(argv):
        with pytest.raises(SystemExit) as e:
            run_main(ft.main, argv)
        return e.value.code

    # --resume DIR: the run folder's last checkpoint
    assert ft.resolve_resume(str(a)) == os.path.join(str(a), "checkpoint-0000004.pt")

    resume = ["--train", data, "--out", str(tmp_path / "c"), "--no-report",
              "--resume", str(a / "checkpoint-0000002.pt")]
    cases = [(["--lr", "0.02"], "--lr 0.01 (checkpoint) vs 0.02 (now)"),
             (["--steps", "1"], "is at step 2, past the end of this run (--steps 1)"),
             (["--set", "stuck_slices=2"], "stuck_slices 3 (checkpoint) vs 2 (now)"),
             (["--hflip", "0.1"], "--hflip 0.5 (checkpoint) vs 0.1 (now)")]
    def no_convert(*a, **k):  # issue 20 defect 22: refused before the (slow) conversion
        raise AssertionError("the model was converted before the resume was checked")
    monkeypatch.setattr(ft.xb, "convert", no_convert)
    for extra, expect in cases:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = refused(COMMON + resume + extra)
        assert code == 2 and expect in err.getvalue(), (extra, err.getvalue())
        assert not os.path.exists(tmp_path / "c" / "result.json")


def test_finetune_calibrates_on_calib_images(tmp_path, monkeypatch):
    """Issue 20 defect 28: finetune.py calibrated on a fixed 8 images; --calib-images N now."""
    import crossbar_torch.nn.calibration as analog
    make_folder(tmp_path / "train", n_good=8)
    spec = importlib.util.spec_from_file_location("_xb_ft_calib", FT)
    ft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ft)
    real, seen = analog.calibrate_from_loader, []

    class Stop(Exception):
        pass

    def spy(model, loader, device, images=8):
        seen.append((images, real(model, loader, device, images)))
        raise Stop  # what follows (training) is tested above

    monkeypatch.setattr(analog, "calibrate_from_loader", spy)
    argv = COMMON + ["--set", "input_bits=8", "--set", "adc_bits=6", "--no-report",
                     "--train", str(tmp_path / "train"), "--out", str(tmp_path / "o")]
    for extra, n in (([], 8), (["--calib-images", "3"], 3)):
        with pytest.raises(Stop):
            ft.main(argv + extra)
        assert seen[-1] == (n, n)


def test_amp_on_cpu_is_said(tmp_path):
    """Issue 20 defect 11: --amp on the CPU was accepted and ignored without a word."""
    make_folder(tmp_path / "train", n_good=4)
    args = list(COMMON)
    del args[args.index("--save-every"):args.index("--save-every") + 2]
    args[args.index("--steps") + 1] = "1"
    r = run(FT, args + ["--train", str(tmp_path / "train"), "--out", str(tmp_path / "o"),
                        "--amp"])
    assert ("warning: --amp (float16 autocast) is CUDA only; on cpu it changes nothing"
            in r.stderr.splitlines())
