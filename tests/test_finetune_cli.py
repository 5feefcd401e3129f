"""scripts/finetune.py end to end on a generated labeled folder with a tiny timm model: trains,
checkpoints atomically, resumes to bit-identical weights, and its final.pt evaluates with
scripts/eval_imagenet.py --checkpoint."""
import json
import os
import subprocess
import sys

import torch

from conftest import REPO
from test_eval import make_folder

FT = os.path.join(REPO, "scripts", "finetune.py")
EVAL = os.path.join(REPO, "scripts", "eval_imagenet.py")
COMMON = ["--model", "test_efficientnet", "--random-init", "--img-size", "32", "--crop-pct", "1.0",
          "--workers", "0", "--batch-size", "2", "--set", "rows=16", "--set", "cols=32",
          "--set", "stuck_slices=3", "--set", "reprogram_fraction=0.25", "--seed", "0",
          "--device", "cpu", "--lr", "0.01", "--steps", "4", "--save-every", "2", "--no-progress"]


def run(script, args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                       cwd=REPO, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_finetune_cli_resume_and_eval(tmp_path):
    make_folder(tmp_path / "train", n_good=8)
    make_folder(tmp_path / "val", n_good=5)
    a, b = tmp_path / "a", tmp_path / "b"
    run(FT, COMMON + ["--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"),
                      "--out", str(a)])
    assert sorted(p for p in os.listdir(a) if p.startswith("checkpoint-")) == [
        "checkpoint-0000002.pt", "checkpoint-0000004.pt"]
    assert not [p for p in os.listdir(a) if p.startswith(".tmp")]  # nothing half-written
    # resume from step 2 into another folder: same final weights, bit for bit
    run(FT, COMMON + ["--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"),
                      "--out", str(b), "--resume", str(a / "checkpoint-0000002.pt")])
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
    assert result  # written atomically next to final.pt
    # the final checkpoint evaluates with the evaluation script
    out = tmp_path / "eval.json"
    run(EVAL, ["--model", "test_efficientnet", "--img-size", "32", "--crop-pct", "1.0",
               "--workers", "0", "--quiet", "--checkpoint", str(a / "final.pt"),
               "--data", str(tmp_path / "val"), "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["images"] == 5 and res["config"]["stuck_slices"] == 3
