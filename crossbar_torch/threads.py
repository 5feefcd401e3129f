"""Results whose bits do not depend on the number of threads.

A multi-threaded BLAS or LAPACK call splits its sums differently for each thread count, so its
rounding moves with it; where such a result decides levels (rule 21's moments and factor, rule
26's gains), the writes per pass moved with the thread count too. These helpers keep each such
computation on one thread, and let the threads share independent computations instead."""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def one_thread():
    """Within: torch (its BLAS and LAPACK calls included) runs on the calling thread alone, so
    that a result's rounding does not move with the thread count; on the way out the thread
    count is what it was."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _on_one_thread(fn, args, grad, inference):
    torch.set_num_threads(1)  # this worker's BLAS calls run on it alone
    # grad and inference mode are per thread: the caller's
    with torch.inference_mode(inference), torch.set_grad_enabled(grad):
        return fn(*args)


class OneThreadEach:
    """Runs independent computations each on one thread, as many at once as torch has threads
    (``torch.get_num_threads()`` when it is made, also where the caller then runs on one), so
    that their bits do not depend on the thread count. A context manager: worker threads (made
    at the first call with more than one job) live while it is open; the model keeps its thread
    count."""

    def __init__(self):
        self.threads = torch.get_num_threads()
        self.pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def products(self, a: list, b: list, bias: torch.Tensor | None = None,
                 linear: bool = False, stacked: bool = False) -> list:
        """``[a[i] @ b[i] ...]`` (``linear``: ``[F.linear(a[i], b[i], bias) ...]``), each on one
        thread. Without autograd to record, on the host, by the ``one_thread_each`` op: the
        jobs on the threads of torch's own pool, where the worker threads of :meth:`map` had
        that pool's idle worker spin against them (a seventh of calibrating the ViT-Base-sized
        model); the same products, so the same bits. ``stacked`` (``linear``, 2-D row blocks
        of one input, one weight): ``[torch.cat(products)]``, the op writing each block's
        product into its rows of the one output (no copy after them)."""
        if not a:  # the op dispatches on its tensors: none to dispatch on
            return []
        tensors = [*a, *b] + ([bias] if bias is not None else [])
        # the op tells MKL to use one thread on each of torch's threads; another BLAS (a torch
        # built without MKL) is not told, and the op runs the products one after the other
        if (torch.backends.mkl.is_available() and all(t.device.type == "cpu" for t in tensors)
                and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))):
            alone = self.threads == 1 or len(a) < 2  # then on the calling thread alone
            with one_thread() if alone else contextlib.nullcontext():
                return torch.ops.crossbar_torch.one_thread_each(a, b, bias, linear, stacked)
        fn = (lambda x, y: F.linear(x, y, bias)) if linear else torch.matmul
        out = self.map(fn, list(zip(a, b)))
        return [out[0] if len(out) == 1 else torch.cat(out)] if stacked else out

    def map(self, fn, jobs: list) -> list:
        """``[fn(*job) for job in jobs]``, each call on one thread (the largest jobs first
        balance best)."""
        if self.threads == 1 or len(jobs) < 2:
            with one_thread():
                return [fn(*job) for job in jobs]
        before = torch.get_num_threads()  # the caller's (one under one_thread())
        try:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(self.threads,
                                               thread_name_prefix="crossbar-one-thread")
            modes = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
            futures = [self.pool.submit(_on_one_thread, fn, job, *modes) for job in jobs]
            return [f.result() for f in futures]
        finally:
            # torch.set_num_threads(1) set BLAS to one thread for the whole process: give the
            # caller back the threads it runs with
            torch.set_num_threads(before)


# ---- the crossbar layers' own products while a result that decides levels is measured ------

_SHARED = []


@contextlib.contextmanager
def sharing_threads():
    """Within: every crossbar layer computes its digital product (a Linear's rows, a
    convolution's batch) in two halves, one thread each (:func:`in_halves`), so that its output
    does not depend on the thread count: a convolution's (oneDNN) did, and with it the next
    layers' moments (rule 21) and the writes (Lite0's preset: 2,473,148 on one thread, 2,473,560
    on two). ``calibrate`` and ``calibrate_gains`` run the model within it."""
    with OneThreadEach() as threads:
        _SHARED.append(threads)
        try:
            yield threads
        finally:
            _SHARED.pop()


def shared():
    """The :class:`OneThreadEach` of the innermost :func:`sharing_threads`, or None."""
    return _SHARED[-1] if _SHARED else None


def splits(x: torch.Tensor) -> bool:
    """Whether a crossbar layer computes its product of ``x`` with :func:`in_halves`: within
    :func:`sharing_threads`, on the host (a GPU's bits do not depend on the host's threads, and
    its streams are per thread)."""
    return shared() is not None and x.device.type == "cpu"


def linear_in_halves(x: torch.Tensor, w: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, bias)`` of 2-D ``x`` as :func:`in_halves` computes it (the same two
    products), by :meth:`OneThreadEach.products`."""
    parts = _halves(x)
    return shared().products(parts, [w] * len(parts), bias, linear=True, stacked=True)[0]


def _halves(x: torch.Tensor) -> list:
    """``x``'s first dimension in two halves (one part under two rows)."""
    h = x.shape[0] // 2
    return [x] if h == 0 else [x[:h], x[h:]]


def in_halves(fn, x: torch.Tensor, *args) -> torch.Tensor:
    """``fn(x, *args)`` with ``x``'s first dimension in two halves (one part under two rows),
    each on one thread of :func:`shared` (which must be active), the parts concatenated."""
    out = shared().map(fn, [(part, *args) for part in _halves(x)])
    return out[0] if len(out) == 1 else torch.cat(out)
