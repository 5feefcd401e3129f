"""Rule 21's input second moments ``E[x x^T]``, accumulated while
:func:`crossbar_torch.calibrate` runs the model (forward pre-hooks on every crossbar layer).

The same calibration data must give the same moment, bit for bit, whatever the number of
threads: rules 21, 23 and 24 choose levels by it, so a moment that moved with the thread count
moved the writes per pass (a multi-threaded BLAS product splits its sums differently for each
thread count: MiniLM's preset counted 4,249,618 writes on one thread, 4,250,246 on two). Each
product is therefore computed by one thread, and the threads share the products (the column
blocks of every chunk of rows) instead of sharing each one (``threads.OneThreadEach``)."""
from __future__ import annotations

import contextlib

import torch

from .errors import InvalidTensorError
from .threads import OneThreadEach


def column_block_width(k: int) -> int:
    """The width of the column blocks that products with ``H``'s upper triangle go by: 8 blocks,
    down to 64 wide (the 3072-input layers' moment products in 1.8x less time than the whole
    square)."""
    return max(64, -(-k // 8))


def moment_block_width(k: int) -> int:
    """The width of the moment products' column blocks: ``column_block_width``, and 16 blocks
    from 2048 inputs on (192 wide on ViT-Base's 3072-input layers: 17/32 of the square's
    products where 8 blocks take 9/16, the same bits on this project's machines, where 96 or
    128 wide changed them)."""
    return max(192, -(-k // 16)) if k >= 2048 else column_block_width(k)


class MomentAccumulator:
    """Sums of ``x x^T`` and sample counts of one layer, per group (rule 21): of each chunk of
    at most 4096 rows, the upper triangle of the product, column block by column block, as
    float32 matrix products (BLAS, one thread each), each block added into a float64 sum, the
    chunks and blocks in order; the lower triangle is mirrored once, when the moment is read.
    A float64 product took twice as long (a third of calibrating the ViT-Base-sized model) for
    a moment that is stored in float32 anyway, and the full product (the lower triangle again,
    and twice the float64 additions) 1.5-1.8x as long as the upper blocks."""

    def __init__(self, groups: int, k: int):
        # the blocks on and above the diagonal, set by the first chunk's products (not zeroed
        # first: a pass over the whole float64 square saved per layer; below them, never read)
        self.sum = torch.empty(groups, k, k, dtype=torch.float64)
        self.count = 0
        self.width = moment_block_width(k)

    def products(self, rows: torch.Tensor, threads: OneThreadEach | None = None) -> list:
        """The chunk products of ``rows`` ((N, groups * K) input rows of the layer, im2col rows
        for a convolution): [([(k0, float32 (G, w, K - k0)), ...], rows in the chunk), ...],
        the rows ``k0 .. k0 + w`` of each chunk's product from the diagonal on. ``threads``:
        the :class:`OneThreadEach` that computes them (one for this call when none is given)."""
        if threads is None:
            with OneThreadEach() as opened:
                return self.products(rows, opened)
        g, k = self.sum.shape[0], self.sum.shape[1]
        chunks = [(c.reshape(-1, g, k).transpose(0, 1), c.shape[0])  # (G, n, K)
                  for c in rows.detach().to("cpu", torch.float32).split(4096)]
        # rows k0 .. k0 + width of x^T x from the diagonal on
        jobs = [(x, k0) for x, _ in chunks for k0 in range(0, k, self.width)]
        done = iter(threads.products([x[:, :, k0:k0 + self.width].transpose(1, 2)
                                      for x, k0 in jobs], [x[:, :, k0:] for x, k0 in jobs]))
        parts = []
        for _, n in chunks:
            blocks = [(k0, next(done)) for k0 in range(0, k, self.width)]
            # a NaN / Inf input makes its row and column of the product non-finite
            # (a block's diagonal, (G, w, K - k0), is that of its leading w x w square)
            if not all(bool(torch.isfinite(p.diagonal(dim1=1, dim2=2)).all()) for _, p in blocks):
                raise InvalidTensorError("calibrate: a layer input holds NaN or Inf (or values "
                                         "whose square overflows float32)")
            parts.append((blocks, n))
        return parts

    def add(self, parts: list) -> None:
        """Sum the chunk products of one forward call (``products``)."""
        for blocks, n in parts:
            first = self.count == 0
            for k0, p in blocks:
                block = self.sum[:, k0:k0 + p.shape[1], k0:]
                if first:  # 0 + p: p, with a product of -0.0 summed to +0.0 as from zeros
                    torch.add(p, 0.0, out=block)
                else:
                    block.add_(p)
            self.count += n

    def moment(self) -> torch.Tensor:
        """The mean ``E[x x^T]`` (float32 (G, K, K)), once: each upper block's sum divided in
        float64 (in place: the sums are done) and rounded to float32, then mirrored."""
        if self.sum is None:
            raise RuntimeError("MomentAccumulator.moment: already read (its sums are divided in "
                               "place and freed)")
        g, k = self.sum.shape[0], self.sum.shape[1]
        if self.count == 0:  # never called: nothing seen
            return torch.zeros(g, k, k, dtype=torch.float32)
        m = torch.empty(g, k, k, dtype=torch.float32)
        # block by block, as the products went: the block's rows from the diagonal on, then
        # the part below its row span from its rows right of its square, and the square's own
        # lower triangle from its upper one (a whole-matrix select with the transpose took twice
        # as long on 3072 inputs; dividing the whole float64 square, lower half included, and
        # converting it whole moved twice the bytes)
        # (the sums were made where the run made them, under inference mode for a sentence
        # model's encode: divided in place there; the moment is an ordinary tensor)
        inference = self.sum.is_inference()
        for k0 in range(0, k, self.width):
            k1 = min(k0 + self.width, k)
            with torch.inference_mode(inference):
                mean = self.sum[:, k0:k1, k0:].div_(self.count)
            m[:, k0:k1, k0:].copy_(mean)
            m[:, k1:, k0:k1] = m[:, k0:k1, k1:].transpose(1, 2)
            square = m[:, k0:k1, k0:k1]
            upper = torch.ones(k1 - k0, k1 - k0, dtype=torch.bool).triu_()
            square.copy_(torch.where(upper, square, square.transpose(1, 2)))
        self.sum = None  # divided: done (and its memory goes back now)
        return m


@contextlib.contextmanager
def collect_moments(layers):
    """While active, every layer of ``layers`` ((name, layer) pairs) accumulates its inputs'
    second moment; on a clean exit each stores it as its ``input_moment``. On an error the
    layers keep the moments they had."""
    accumulators, handles = {}, []
    # Linear layers that read the same tensor (a transformer's query, key and value) read the
    # same rows: their products are computed once. Shared only when the tensor still equals a
    # copy taken with the products (an in-place change in between is seen, also under
    # inference mode, which keeps no version counter); the copy costs 1 / K of the product.
    # A copy is taken on a layer's first call, and later only for the layers whose input the
    # next layer read (the query's): the other layers' copies (the FFN's 3072-wide inputs on
    # ViT-Base) were never read.
    last = {}
    seen, shared = set(), set()  # layers called before; layers whose input the next one read
    threads = OneThreadEach()

    def hook(module, args):
        x = args[0]
        acc = accumulators.get(id(module))
        if acc is None:
            acc = accumulators[id(module)] = MomentAccumulator(module.moment_groups,
                                                               module.cells.shape[1])
        if (module.shares_input_rows and last.get("x") is x
                and torch.equal(x, last["copy"])):
            parts = last["parts"]
            shared.add(last["layer"])
        else:
            parts = acc.products(module.input_rows(x), threads)
            last.clear()
            if module.shares_input_rows and (id(module) not in seen or id(module) in shared):
                last.update(x=x, copy=x.detach().clone(), parts=parts, layer=id(module))
        seen.add(id(module))
        acc.add(parts)

    for _, layer in layers:
        handles.append(layer.register_forward_pre_hook(hook))
    try:
        with threads:
            yield accumulators
    finally:
        last.clear()
        for h in handles:
            h.remove()
    for _, layer in layers:
        acc = accumulators.get(id(layer))
        if acc is not None:
            layer.input_moment = acc.moment().to(layer.cells.device)
