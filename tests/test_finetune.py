"""Stuck-bit-aware fine-tuning (issue 6): straight-through gradients, stuck cells kept, exact
resume, checkpoints, losses, and the two worked examples."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import crossbar_torch as xb
from crossbar_torch.apps.finetune import (FinetuneArgs, ResumeError, Trainer, TrainingDiverged,
                                     check_stuck_cells, cross_entropy, distillation_loss,
                                     freeze_batchnorm, load_checkpoint, load_finetuned,
                                     save_final, stuck_snapshot)
from crossbar_torch.ops import reference

ROOT = Path(__file__).resolve().parents[1]
STUCK = xb.CrossbarConfig(rows=16, cols=32, weight_bits=8, stuck_slices=3,
                          reprogram_fraction=0.3, seed=3)


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


class Tiny(nn.Module):
    def __init__(self, dropout=0.2):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = F.relu(self.dw(x)).mean((2, 3))
        return self.fc(self.drop(x))


def tiny_builder(state):
    """A model builder for load_finetuned: a fresh Tiny holding ``state``, in eval mode."""
    def build():
        m = Tiny()
        m.load_state_dict(state)
        return m.eval()
    return build


def tiny_model(seed=0, config=STUCK):
    torch.manual_seed(seed)
    return xb.convert(Tiny().eval(), config)


class NoisyData(torch.utils.data.Dataset):
    """Random augmentation from all three RNGs, so exact resume must handle them."""

    def __init__(self, n=36, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 6, 6, generator=g)
        self.y = torch.randint(0, 5, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        import random
        import numpy as np
        x = self.x[i] + 0.1 * torch.randn(3, 6, 6)
        if random.random() < 0.5:
            x = x.flip(-1)
        x = x * float(np.random.uniform(0.9, 1.1))
        return x, int(self.y[i])


# ------------------------------------------------------------------------------- losses

def test_distillation_loss_sanity():
    torch.manual_seed(0)
    s = torch.randn(6, 10)
    assert float(distillation_loss(s, s.clone(), T=3.0)) == pytest.approx(0.0, abs=1e-6)
    t = torch.randn(6, 10)
    for T in (1.0, 4.0):
        kd = distillation_loss(s, t, T=T)
        assert float(kd) > 0
        ref = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1),
                       reduction="batchmean") * T * T
        torch.testing.assert_close(kd, ref)
    y = torch.randint(0, 10, (6,))
    mixed = distillation_loss(s, t, T=2.0, alpha=0.25, labels=y)
    torch.testing.assert_close(
        mixed, 0.25 * distillation_loss(s, t, T=2.0) + 0.75 * F.cross_entropy(s, y))
    # unknown labels (-1) only: KD alone; CE ignores them
    assert float(distillation_loss(s, t, 2.0, 0.5, torch.full((6,), -1))) == \
        pytest.approx(float(distillation_loss(s, t, 2.0)))
    assert float(cross_entropy(s, torch.tensor([1, -1, 2, -1, 3, 4]))) > 0
    # gradient flows only into the student
    s.requires_grad_(True)
    t.requires_grad_(True)
    distillation_loss(s, t, 2.0).backward()
    assert s.grad is not None and t.grad is None


# ---------------------------------------------------------------- straight-through gradient

@pytest.mark.parametrize("kind", ["conv", "dwconv", "linear"])
def test_gradient_reaches_latent_weight_straight_through(kind):
    torch.manual_seed(1)
    if kind == "conv":
        layer = xb.CrossbarConv2d.from_conv(nn.Conv2d(4, 6, 3, padding=1), STUCK)
        x = torch.randn(2, 4, 5, 5)
        fn = lambda w: F.conv2d(x, w, layer.bias, 1, 1)  # noqa: E731
    elif kind == "dwconv":
        layer = xb.CrossbarConv2d.from_conv(nn.Conv2d(6, 6, 3, padding=1, groups=6), STUCK)
        x = torch.randn(2, 6, 5, 5)
        fn = lambda w: F.conv2d(x, w, layer.bias, 1, 1, 1, 6)  # noqa: E731
    else:
        layer = xb.CrossbarLinear.from_linear(nn.Linear(40, 7), STUCK)
        x = torch.randn(3, 40)
        fn = lambda w: F.linear(x, w, layer.bias)  # noqa: E731
    xb.reprogram(layer)
    assert layer.stuck_cells().any()
    layer.train()
    g_out = torch.randn_like(layer(x))
    (layer(x) * g_out).sum().backward()
    # functional re-computation with the effective weight as a leaf
    w_eff = layer.simulated_weight().detach().clone().requires_grad_(True)
    (fn(w_eff) * g_out).sum().backward()
    torch.testing.assert_close(layer.weight.grad, w_eff.grad, rtol=0, atol=0)
    # and the forward used exactly that effective weight, which differs from the latent one
    torch.testing.assert_close(layer(x), fn(w_eff.detach()), rtol=0, atol=0)
    assert not torch.equal(w_eff.detach(), layer.weight.detach())


def test_train_mode_without_stucking_equals_quantized_weights():
    cfg = xb.CrossbarConfig(rows=16, cols=32)
    torch.manual_seed(2)
    layer = xb.CrossbarConv2d.from_conv(nn.Conv2d(5, 6, 3), cfg)
    q, s = reference.quantize(layer.weight.detach().reshape(6, -1).float(), 8, True)
    expect = (q.float() * s[:, None]).reshape(layer.weight.shape)
    layer.train()
    torch.testing.assert_close(layer.simulated_weight().detach(), expect, rtol=0, atol=0)
    x = torch.randn(2, 5, 7, 7)
    y_train = layer(x)
    layer.eval()
    torch.testing.assert_close(y_train.detach(), layer(x), rtol=0, atol=0)
    # after an update the quantization follows the latent weight (fixed scales, clamped)
    with torch.no_grad():
        layer.weight.add_(0.05 * torch.randn_like(layer.weight))
    q2 = torch.clamp(torch.round(layer.weight.detach().reshape(6, -1) / s[:, None]), -127, 127)
    layer.train()
    torch.testing.assert_close(layer.simulated_weight().detach(),
                               (q2 * s[:, None]).reshape(layer.weight.shape), rtol=0, atol=0)


# ------------------------------------------------------------ stuck cells across training

def test_stuck_cells_keep_levels_across_optimizer_steps_and_reprogram():
    model = tiny_model()
    snap = stuck_snapshot(model)
    assert snap and sum(int(m.sum()) for m, _ in snap.values()) > 0
    cells0 = {n: l.cells.clone() for n, l in xb.crossbar_layers(model)}
    targets0 = {n: l.target_cells() for n, l in xb.crossbar_layers(model)}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    freeze_batchnorm(model)
    data = NoisyData()
    for i in range(5):
        opt.zero_grad()
        F.cross_entropy(model(data.x[i * 6:(i + 1) * 6]), data.y[i * 6:(i + 1) * 6]).backward()
        opt.step()
        assert check_stuck_cells(model, snap, simulated=True) > 0
    for n, l in xb.crossbar_layers(model):  # training does not touch what the crossbars hold
        assert torch.equal(l.cells, cells0[n])
    changed = sum(int((l.target_cells() != targets0[n]).sum())
                  for n, l in xb.crossbar_layers(model))
    assert changed > 0  # the training did move weights across quantization levels
    xb.reprogram(model)
    assert check_stuck_cells(model, snap) > 0
    # non-stuck cells now hold the new targets
    for n, l in xb.crossbar_layers(model):
        free = ~l.stuck_cells()
        assert torch.equal(l.held_cells()[free], l.target_cells()[free])


# ------------------------------------------------------------------------- exact resume

def _trainer(out_dir, **kw):
    model = tiny_model()
    args = FinetuneArgs(loss="ce", steps=11, batch_size=8, lr=0.05, opt="sgd", sched="cosine",
                        warmup_steps=2, seed=5, progress=False, out_dir=str(out_dir), **kw)
    return Trainer(model, NoisyData(), args)


@pytest.mark.parametrize("stop", [4, 7])  # 4 steps = one epoch (36 // 8): an epoch boundary
def test_resume_is_bit_identical(tmp_path, stop):
    full = _trainer(tmp_path / "full", save_every=3)
    r_full = full.fit()
    assert r_full.steps == 11 and r_full.program is not None
    part = _trainer(tmp_path / "part")
    r_part = part.fit(stop_after=stop)
    assert r_part.steps == stop and r_part.program is None
    ck = load_checkpoint(r_part.checkpoint)
    assert ck["step"] == stop and "rng" in ck and "optimizer" in ck and "scheduler" in ck
    # the device's values, not its name or path (issue 17): the checkpoint loads anywhere
    assert ck["crossbar_config"] == STUCK.with_device_values().to_dict()
    assert ck["crossbar_config"]["device"]["name"] == STUCK.device
    resumed = _trainer(tmp_path / "resumed")
    r_res = resumed.fit(resume=r_part.checkpoint)
    assert r_res.steps == 11
    a, b = full.student.state_dict(), resumed.student.state_dict()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
    assert [l for _, l in r_full.losses] == [l for _, l in r_res.losses]
    assert r_full.program.per_pass.writes == r_res.program.per_pass.writes
    # checkpoints every 3 steps plus the final one; written atomically (no temp files left)
    names = sorted(os.listdir(tmp_path / "full"))
    assert "checkpoint-0000003.pt" in names and "checkpoint-0000011.pt" in names
    assert not [n for n in names if n.startswith(".tmp-")]
    # resuming from a periodic checkpoint gives the same end as well
    again = _trainer(tmp_path / "again")
    again.fit(resume=tmp_path / "full" / "checkpoint-0000006.pt")
    assert torch.equal(again.student.fc.weight, full.student.fc.weight)


def test_resume_is_bit_identical_with_read_noise(tmp_path):
    """Issue 20 defect 4: the per-layer read-noise draw counter was neither saved nor
    restored, so a resumed run drew the noise of other forwards."""
    cfg = STUCK.replace(read_noise=0.05)

    def trainer(out):
        args = FinetuneArgs(loss="ce", steps=4, batch_size=8, lr=0.05, opt="sgd", seed=5,
                            progress=False, out_dir=str(out))
        return Trainer(tiny_model(config=cfg), NoisyData(), args)

    full = trainer(tmp_path / "full")
    r_full = full.fit()
    part = trainer(tmp_path / "part")
    r_part = part.fit(stop_after=2)
    ck = load_checkpoint(r_part.checkpoint)
    assert set(ck["read_noise_draws"]) == {n for n, _ in xb.crossbar_layers(part.student)}
    assert all(v == 2 for v in ck["read_noise_draws"].values())  # one forward per step
    resumed = trainer(tmp_path / "resumed")
    r_res = resumed.fit(resume=r_part.checkpoint)
    assert [l for _, l in r_full.losses] == [l for _, l in r_res.losses]
    a, b = full.student.state_dict(), resumed.student.state_dict()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k


def test_kd_trainer_runs_and_checks_teacher_is_needed():
    torch.manual_seed(0)
    teacher = Tiny().eval()
    student = xb.convert(teacher, STUCK)
    with pytest.raises(ValueError, match="teacher"):
        Trainer(student, NoisyData(), FinetuneArgs(loss="kd", progress=False))
    tr = Trainer(student, NoisyData(), FinetuneArgs(loss="kd+ce", steps=3, batch_size=8,
                                                    progress=False), teacher=teacher)
    res = tr.fit()
    assert res.steps == 3 and all(torch.isfinite(torch.tensor(l)) for _, l in res.losses)
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())


# ------------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip_into_fresh_converted_model(tmp_path):
    torch.manual_seed(4)
    builder = tiny_builder(Tiny().state_dict())

    model = xb.convert(builder(), STUCK)
    tr = Trainer(model, NoisyData(), FinetuneArgs(steps=4, batch_size=8, lr=0.1, opt="sgd",
                                                  progress=False))
    tr.fit()
    path = tmp_path / "final.pt"
    save_final(model, path, model_name="tiny")
    ck = torch.load(path, weights_only=True)
    assert set(ck) >= {"model", "crossbar_config", "model_name"}
    loaded = load_finetuned(path, builder)
    x = torch.randn(3, 3, 6, 6)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, loaded.state_dict()[k]), k
    # a builder taking the saved model name works too
    loaded2 = load_finetuned(path, lambda name: builder())
    torch.testing.assert_close(loaded2(x), loaded(x), rtol=0, atol=0)


# ---------------------------------------------------------------------- worked example 1

def test_digits_example_recovers_most_of_the_stucking_loss():
    """Measured (seed 0, 8 epochs, rows=cols=32, stuck_slices=5, p=0.25): float 98.9, stuck
    37.3, fine-tuned 98.9, recovered fraction 1.00 (seeds 1 and 2: 1.00 and 1.02). The bound
    0.8 leaves a margin for BLAS / platform differences; stucking must cost at least 5 points
    so the recovery means something (with 4 slices, newer packages train a float model that
    loses only 2 points: docs/finetune/RESULTS.md)."""
    ex = _script("example_digits")
    r = ex.run(seed=0)
    assert r["top1_float"] >= 95.0
    assert r["top1_float"] - r["top1_stuck"] >= 5.0
    assert r["recovered_fraction"] >= 0.8
    assert r["top1_finetuned"] >= r["top1_float"] - 3.0
    assert r["stuck_cells_checked"] > 0
    assert r["before"]["writes_per_pass"] > 0 and r["after"]["writes_per_pass"] > 0


# ---------------------------------------------------------------------- worked example 2

@pytest.mark.slow
def test_lite0_distillation_short_run():
    pytest.importorskip("timm")
    data = ROOT.parent / "shared" / "data" / "imagenet-sample-dev"
    if not (data / "val").is_dir():
        pytest.skip(f"no data at {data}")
    ex = _script("example_lite0_distill")
    r = ex.run(data, steps=10, batch_size=4, limit_train=8, limit_eval=8, progress=False,
               log=lambda *a: None)
    assert r["steps"] == 10 and r["train_images"] == 8 and r["eval_images"] == 8
    assert (r["loss_mean_last5"] < r["loss_mean_first5"]
            or r["finetuned"]["top1"] >= r["stuck"]["top1"])
    assert r["after"]["writes_per_pass"] > 0 and r["before"]["writes_per_pass"] > 0
    assert r["stuck_cells_checked"] > 0


# ------------------------------------------------- resume that tells the truth (issue 12)

def _stopped_run(tmp_path, stop=4, **kw):
    tr = _trainer(tmp_path / "stopped", **kw)
    res = tr.fit(stop_after=stop)
    return res.checkpoint


@pytest.mark.parametrize("change, named", [
    ({"lr": 0.01}, "lr 0.05 (checkpoint) vs 0.01 (now)"),
    ({"batch_size": 4}, "batch_size 8 (checkpoint) vs 4 (now)"),
    ({"steps": 12}, "steps 11 (checkpoint) vs 12 (now)"),
    ({"opt": "adamw"}, "opt sgd (checkpoint) vs adamw (now)"),
])
def test_resume_refuses_changed_arguments_naming_them(tmp_path, change, named):
    ck = _stopped_run(tmp_path)
    model = tiny_model()
    args = dict(loss="ce", steps=11, batch_size=8, lr=0.05, opt="sgd", sched="cosine",
                warmup_steps=2, seed=5, progress=False)
    args.update(change)
    tr = Trainer(model, NoisyData(), FinetuneArgs(**args))
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ResumeError, match="other arguments") as e:
        tr.fit(resume=ck)
    assert named in str(e.value)
    assert e.value.changes and e.value.changes[0][0] == next(iter(change))
    for k, v in model.state_dict().items():  # nothing was trained or loaded
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k


def test_resume_may_change_what_does_not_change_the_result(tmp_path):
    ck = _stopped_run(tmp_path)
    tr = _trainer(tmp_path / "other", workers=0, save_every=5, keep=1)
    assert tr.fit(resume=ck).steps == 11


def test_resume_with_fewer_steps_than_the_checkpoint_is_an_error(tmp_path):
    ck = _stopped_run(tmp_path, stop=7)
    model = tiny_model()
    tr = Trainer(model, NoisyData(), FinetuneArgs(loss="ce", steps=5, batch_size=8, lr=0.05,
                                                  opt="sgd", warmup_steps=2, seed=5,
                                                  progress=False))
    with pytest.raises(ResumeError, match="at step 7, past the end of this run"):
        tr.fit(resume=ck)


def test_resume_config_mismatch_names_the_field(tmp_path):
    ck = _stopped_run(tmp_path)
    other = STUCK.replace(reprogram_fraction=0.5)
    model = tiny_model(config=other)
    tr = Trainer(model, NoisyData(), FinetuneArgs(loss="ce", steps=11, batch_size=8, lr=0.05,
                                                  opt="sgd", warmup_steps=2, seed=5,
                                                  progress=False))
    with pytest.raises(ResumeError, match="CrossbarConfig") as e:
        tr.fit(resume=ck)
    assert "reprogram_fraction 0.3 (checkpoint) vs 0.5 (now)" in str(e.value)
    assert "stuck_slices" not in str(e.value)  # only the field that differs


def test_resume_logs_and_reports_the_step(tmp_path):
    ck = _stopped_run(tmp_path, stop=6)
    msgs = []
    tr = Trainer(tiny_model(), NoisyData(), FinetuneArgs(
        loss="ce", steps=11, batch_size=8, lr=0.05, opt="sgd", sched="cosine", warmup_steps=2,
        seed=5, progress=False), log=msgs.append)
    res = tr.fit(resume=ck)
    assert any(m.startswith("resumed from step 6 of 11") for m in msgs), msgs
    assert res.resumed_from == {"checkpoint": str(ck), "step": 6}
    assert res.summary()["resumed_from"]["step"] == 6
    assert res.steps == 11 and len(res.losses) == 11  # the 6 restored and the 5 new ones


def test_resume_from_other_float_weights_is_refused(tmp_path):
    ck = _stopped_run(tmp_path)
    tr = Trainer(tiny_model(seed=1), NoisyData(), FinetuneArgs(
        loss="ce", steps=11, batch_size=8, lr=0.05, opt="sgd", sched="cosine", warmup_steps=2,
        seed=5, progress=False))
    with pytest.raises(ResumeError, match="crossbars of this run's converted model differ"):
        tr.fit(resume=ck)


# ------------------------------------------------------- checkpoints: content and count

def test_checkpoint_holds_only_what_resume_needs(tmp_path):
    ck_path = _stopped_run(tmp_path)
    ck = load_checkpoint(ck_path)
    model = tiny_model()
    full = model.state_dict()
    derived = [k for k in full if k.rsplit(".", 1)[-1] in ("cells", "stuck", "sort_index")]
    assert derived and not [k for k in derived if k in ck["model"]]
    # every parameter and the BatchNorm statistics are there
    for k, v in model.named_parameters():
        assert k in ck["model"]
    assert "bn.running_mean" in ck["model"]
    assert {"optimizer", "scheduler", "rng", "step", "crossbar_config", "finetune_args"} <= set(ck)
    # the tensor bytes are the full state dict's without the derived buffers (packed cells,
    # packed stuck masks and narrow sort indices: ~1.5x the float weights here)
    def nbytes(sd):
        return sum(v.numel() * v.element_size() for v in sd.values() if isinstance(v, torch.Tensor))
    saved = nbytes({k: full[k] for k in derived})
    assert saved > 0 and nbytes(ck["model"]) <= nbytes(full) - saved


def test_keep_only_the_last_checkpoints(tmp_path):
    tr = _trainer(tmp_path / "run", save_every=2, keep=2)
    tr.fit()
    names = sorted(n for n in os.listdir(tmp_path / "run") if n.startswith("checkpoint-"))
    assert names == ["checkpoint-0000010.pt", "checkpoint-0000011.pt"]
    assert (tmp_path / "run" / "last_checkpoint.txt").read_text().strip() == names[-1]
    # (keep=0 keeps all: test_resume_is_bit_identical finds checkpoint 3 next to 11)


def test_training_checkpoint_loads_with_rebuilt_buffers(tmp_path):
    """load_finetuned on a checkpoint-<step>.pt: converted from the original weights, given
    the checkpoint's latent weights, reprogrammed = the trained model, bit for bit."""
    torch.manual_seed(0)
    base = Tiny().eval()
    builder = tiny_builder({k: v.clone() for k, v in base.state_dict().items()})

    model = xb.convert(builder(), STUCK)
    tr = Trainer(model, NoisyData(), FinetuneArgs(steps=3, batch_size=8, lr=0.1, opt="sgd",
                                                  progress=False, out_dir=str(tmp_path)))
    res = tr.fit()
    loaded = load_finetuned(res.checkpoint, builder)
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, loaded.state_dict()[k]), k
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        torch.manual_seed(9)
        load_finetuned(res.checkpoint, lambda: Tiny().eval())


def test_unreadable_checkpoint_names_the_file(tmp_path):
    from crossbar_torch.apps.checkpoint import WeightLoadError
    p = tmp_path / "ck.pt"
    p.write_bytes(os.urandom(1000))
    with pytest.raises(WeightLoadError, match="ck.pt"):
        load_checkpoint(p)
    with pytest.raises(WeightLoadError, match="ck.pt"):
        load_finetuned(p, lambda: Tiny())


# ----------------------------------------------------------- divergence and bad images

def test_divergence_names_the_step_and_the_layers():
    model = tiny_model()
    model.fc.weight.register_hook(lambda g: g * float("nan"))  # a NaN gradient in one layer
    with pytest.raises(TrainingDiverged, match=r"step 1: NaN / Inf in fc.weight \("):
        Trainer(model, NoisyData(), FinetuneArgs(loss="ce", steps=3, batch_size=8,
                                                 progress=False)).fit()

    class InfData(NoisyData):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return x * float("inf"), y
    with pytest.raises(TrainingDiverged, match="step 1: the loss is nan"):
        Trainer(tiny_model(), InfData(), FinetuneArgs(loss="ce", steps=3, batch_size=8,
                                                      progress=False)).fit()


def test_unreadable_training_images_stop_or_are_skipped():
    from crossbar_torch.apps.data import BadImage, UnreadableImageError

    class WithBad(NoisyData):
        def __getitem__(self, i):
            if i == 3:
                return BadImage(3, "/data/broken.jpg", "OSError: truncated")
            return super().__getitem__(i)
    args = dict(loss="ce", steps=9, batch_size=8, progress=False)
    with pytest.raises(UnreadableImageError, match="broken.jpg"):
        Trainer(tiny_model(), WithBad(), FinetuneArgs(**args)).fit()
    res = Trainer(tiny_model(), WithBad(), FinetuneArgs(**args, skip_bad=True)).fit()
    assert res.steps == 9
    assert res.bad_images == [{"path": "/data/broken.jpg", "reason": "OSError: truncated"}]


# -------------------------------------------------------------------- file permissions

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_honour_the_umask(tmp_path, umask):
    from crossbar_torch.config import atomic_write_text
    from crossbar_torch.apps.finetune import atomic_torch_save
    old = os.umask(umask)
    try:
        atomic_torch_save({"a": torch.zeros(2)}, tmp_path / "c.pt")
        atomic_write_text(tmp_path / "r.json", "{}\n")
        with open(tmp_path / "plain", "w") as f:  # what a plain open() gives
            f.write("x")
    finally:
        os.umask(old)
    want = os.stat(tmp_path / "plain").st_mode & 0o777
    assert want == 0o666 & ~umask
    for name in ("c.pt", "r.json"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == want, name
