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
from crossbar_torch.finetune import (FinetuneArgs, Trainer, check_stuck_cells, cross_entropy,
                                     distillation_loss, freeze_batchnorm, load_checkpoint,
                                     load_finetuned, save_final, stuck_snapshot)
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
    assert layer.stuck.any()
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
        free = ~l.stuck
        assert torch.equal(l.cells[free], l.target_cells()[free])


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
    assert ck["crossbar_config"] == STUCK.to_dict()
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
    base_state = Tiny().state_dict()

    def builder():
        m = Tiny()
        m.load_state_dict(base_state)
        return m.eval()

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
