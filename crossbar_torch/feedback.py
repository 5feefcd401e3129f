"""Output-aware programming (docs/semantics.md rule 21): error feedback through the layer's
input second moment.

Why it is needed (docs/transformers.md): with value sort and a similarity mapping, neighbouring
weights of a filter share crossbar rows whose stuck cells err alike, so a filter's per-weight
errors (each at most a few LSB) line up instead of cancelling, and a layer whose inputs are
mostly of one sign (the FFN's second layer reads GELU outputs) adds them up in its output.
Choosing each weight among the values its held cells allow *while carrying the residual onto
the weights not yet chosen*, weighted by ``H = E[x x^T]``, cancels that sum (GPTQ / OBQ applied
to stuck cells).

The stages, one owner each:

* ``moments.collect_moments``: forward pre-hooks that accumulate ``E[x x^T]`` of every layer's
  inputs (per group for grouped convolutions) while :func:`crossbar_torch.calibrate` runs the
  model; stored as the layer's ``input_moment`` buffer (float32 ``(groups, K, K)``), so a saved
  model can be reprogrammed without its calibration data;
* ``feedback_factor``: the unit upper triangular factor ``U`` of the damped moment
  (``U D U^T``);
* ``feedback_choice``: the integer targets of one layer (the ``feedback_quantize`` op), which
  programming then writes with rule 13 (every chosen value is reachable, so the layer computes
  with exactly these integers).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import ops
from .errors import ModelStateError
from .moments import column_block_width
from .threads import OneThreadEach, one_thread


def feedback_factor(moment: torch.Tensor, damp: float) -> torch.Tensor:
    """Rule 21's factor (float64 (G, K, K)) of each group's ``H`` (float32 (G, K, K)): ``U``
    unit upper triangular and ``D`` diagonal with ``U D U^T = H + lambda I``, ``U``'s strict
    upper triangle above ``D`` on the diagonal. An input never seen (``H[k, k] == 0``) gets
    ``H[k, k] = 1`` (its weight carries no error onward); ``lambda = damp * mean(diag H)`` per
    group. LAPACK's factor on one thread (its rounding moved with the thread count)."""
    with one_thread():
        return _factor(moment, damp)


def _factor(moment: torch.Tensor, damp: float) -> torch.Tensor:
    """``feedback_factor`` on the calling thread's torch thread count (one, by its callers)."""
    # With J the order reversal and J Hd J = L L^T (Cholesky), Hd = (J L J)(J L^T J): J L J is
    # upper triangular, and with its columns divided by its diagonal d it is U, D = d^2. One
    # factorisation, where carrying (t - v) / R[k, k] through R with R^T R = Hd^-1 (GPTQ's form,
    # the same choices in exact arithmetic) needed a triangular inverse as well. The op writes
    # J Hd J straight into LAPACK's buffer and reads U back from it (csrc/cpu/
    # feedback_factor_kernel.cpp: the torch ops' flips and copies were a fifth of the time)
    return ops.feedback_factor(moment.detach().to("cpu", torch.float32), damp)


def feedback_factors(moments: list, damp: float) -> list:
    """``feedback_factor`` of each moment (the same bits), side by side, each on one thread:
    two factors of a 3072-input layer in 0.35 s on two threads."""
    with OneThreadEach() as threads:
        return threads.map(_factor, [(m, damp) for m in moments])


def damped_moment(moment: torch.Tensor, damp: float) -> torch.Tensor:
    """Rule 21's damped moment ``H + lambda I`` (float64 (G, K, K), on the host): an input never
    seen (``H[k, k] == 0``) gets ``H[k, k] = 1``; ``lambda = damp * mean(diag H)`` per group."""
    h = moment.detach().to("cpu", torch.float64, copy=True)
    if h.shape[-1] == 0:
        return h
    damp_diagonal_(h.diagonal(dim1=1, dim2=2), damp)
    return h


def damp_diagonal_(diag: torch.Tensor, damp: float) -> torch.Tensor:
    """Rule 21's damping of ``H``'s diagonal (float64 (G, K)), in place: a zero entry becomes 1,
    then ``damp`` times the group's mean entry is added."""
    diag[diag == 0] = 1.0
    diag += damp * diag.mean(dim=1, keepdim=True)
    return diag


def placement_predecessors(filter_index: torch.Tensor, out: int, config) -> torch.Tensor:
    """Rule 23: ``pred`` (int64 (out,)): the filter in the same slot ``pool`` column blocks
    earlier, whose tile is the one programmed just before its own on the same crossbar in
    section-major order; -1 where there is none (the first ``pool`` blocks, or a hole)."""
    slots = config.filters_per_crossbar
    pred = torch.full((out,), -1, dtype=torch.int64)
    fi = filter_index.detach().to("cpu", torch.int64).reshape(-1, slots)  # (nb, F)
    cur, prev = fi[config.pool:], fi[:-config.pool] if config.pool < fi.shape[0] else fi[:0]
    both = (cur >= 0) & (prev >= 0)
    pred[cur[both]] = prev[both]
    return pred


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.device == b.device and torch.equal(a, b)


class FactorCache:
    """The factor of the layer programmed last, given again for the next layer when its moment
    and damping are equal: a transformer's query, key and value read the same rows, so their
    moments are equal and one factor serves the three (the same U, so the same choices).

    ``plan``: the (moment, damping) of the layers still to be programmed, in order. A factor
    not at hand is then computed side by side with the next planned one of the same shape
    (``feedback_factors``; the same bits), which is kept until its layer asks for it (on the
    ViT-Base-sized model two factors more in memory at most)."""

    def __init__(self, plan: list | tuple = ()):
        self.moment = self.damp = self.u = None
        self.plan = list(plan)
        self.ahead = {}  # id(moment) -> (moment, damp, U), computed ahead of its layer

    def factor(self, moment: torch.Tensor, damp: float) -> torch.Tensor:
        last = self.moment
        if last is not None and damp == self.damp and _same(last, moment):
            return self.u
        ahead = self.ahead.pop(id(moment), None)
        if ahead is not None and ahead[0] is moment and ahead[1] == damp:
            u = ahead[2]
        else:
            partner = self._partner(moment, damp)
            if partner is None:
                u = feedback_factor(moment, damp)
            else:
                u, later = feedback_factors([moment, partner], damp)
                self.ahead[id(partner)] = (partner, damp, later)
        self.moment, self.damp, self.u = moment, damp, u
        return u

    def _partner(self, moment: torch.Tensor, damp: float) -> torch.Tensor | None:
        """The next planned moment after ``moment`` with its shape and damping, another factor
        (not equal to it) and none computed yet, or None."""
        at = next((i for i, (m, _) in enumerate(self.plan) if m is moment), None)
        if at is None:
            return None
        for m, d in self.plan[at + 1:]:
            if (d == damp and id(m) not in self.ahead and m.shape == moment.shape
                    and m.device == moment.device and not torch.equal(m, moment)):
                return m
        return None


@torch.no_grad()
def feedback_choice(layer, config, factors: FactorCache | None = None) -> tuple:
    """Rule 21: the integers (int32 (out, K), original order) that programming writes into
    ``layer``: each weight the allowed value nearest its running target, filters in parallel,
    inputs in order. Held cells are the layer's stuck cells at the levels it holds. ``factors``
    reuses the previous layer's factor when it is the same (one per programming pass). With
    them, ``tr(E H E^T)``, the output error energy the layer has once programmed with them
    (``residual_energy``; after rule 24's sweeps ``swept_energy``)."""
    w = layer.matrix_weight().detach().to("cpu", torch.float32)
    scale = layer.scale.detach().to("cpu", torch.float32)
    target = (w / scale[:, None]).to(torch.float64)  # rule 2's division, in float32
    u = (factors or FactorCache()).factor(layer.input_moment, config.feedback_damp)
    index = None
    if config.stucking and layer.stuck.numel():
        # the layer's own packed buffers, as stored (sorted order): the kernel reads each
        # weight's bytes at its sorted position, a filter at a time
        held, levels = layer.stuck.cpu(), layer.cells.cpu()
        index = layer.long_sort_index().cpu()
        slices = config.stuck_slices
    else:
        held = torch.zeros(0, dtype=torch.bool)
        levels = torch.zeros(0, dtype=torch.uint8)
        slices = 0
    pred = None
    if config.write_penalty > 0 or config.feedback_sweeps > 0:
        # rule 23: charged against the predecessor's chosen cells; rule 24: its sweeps' order
        pred = placement_predecessors(layer.filter_index, target.shape[0], config)
        index = layer.long_sort_index().cpu() if index is None else index
    fw = layer_filter_weights(layer, config, scale)
    q, running = ops.feedback_quantize(target.contiguous(), u, held, levels, config.weight_bits,
                                       config.bits_per_cell, config.encoding_id, slices,
                                       pred if config.write_penalty > 0 else None, index,
                                       config.write_penalty, fw, running=True)
    if config.feedback_sweeps > 0:  # rule 24 (nothing is held: the config sticks nothing)
        hs = scaled_moment(layer.input_moment, config.feedback_damp)
        q, forms = ops.feedback_refine(target.contiguous(), hs, q, pred, index,
                                       config.weight_bits, config.bits_per_cell,
                                       config.encoding_id, config.write_penalty,
                                       config.feedback_sweeps, fw, forms=True)
        return q, swept_energy(q, forms, target, layer.input_moment, config.feedback_damp,
                               scale)
    return q, residual_energy(q, running, target, u, layer.input_moment, config.feedback_damp,
                              scale)


def residual_energy(q, running, target, u, moment, damp: float, scale) -> float:
    """``tr(E H E^T)`` of a layer programmed with rule 21's integers ``q`` (its effective
    weights, rule 21), ``E = s (q - t0)``, from the kernel's running targets alone: with
    ``e = q - t0``, ``e^T Hd e = sum_k D[k] (q[k] - t[k])^2`` (rule 21's identity: ``t[k] =
    t0[k] - sum_{j<k} U[j, k] e[j]``), and ``Hd - H`` is diagonal. O(out K) where the products
    with ``H`` are O(out K^2): the reprogramming's warning (``warn_output_errors``) reads it.
    Equal to the products' value up to rounding (and to ``s t0`` standing for ``W``)."""
    extra, _ = damping_of_diagonal(moment, damp)
    s2 = scale.to(torch.float64).square()
    num = 0.0
    for g, rows in row_chunks(q.shape, u.shape[0]):
        d, x = u[g].diagonal(), extra[g]
        qd = q[rows].double()
        r2 = torch.sub(qd, running[rows]).square_()
        e2 = qd.sub_(target[rows]).square_()
        num += float((s2[rows] * (r2 @ d - e2 @ x)).sum())
    return num


def damping_of_diagonal(moment, damp: float) -> tuple:
    """``(Hd - H, mean of Hd's diagonal)`` of each group (float64 (G, K) and (G,)): rule 21's
    damping, ``lambda`` and ``1 + lambda`` where ``H[k, k] == 0``, all ``Hd - H`` holds (it is
    diagonal), and rule 24's scale ``m`` (``Hs = Hd / m``)."""
    h = moment.detach().diagonal(dim1=1, dim2=2).to("cpu", torch.float64, copy=True)
    hd = damp_diagonal_(h.clone(), damp)
    return hd - h, hd.mean(dim=1)


def row_chunks(shape, groups: int):
    """``(group, rows)`` of an (out, K) layer, a few rows at a time within each group: their
    float64 squares stay in cache, where whole-layer ones were four transient copies of the
    layer (out, K) in float64."""
    out, k = shape
    per = out // groups
    step = max(1, RESIDUAL_CHUNK // max(k, 1))
    for g in range(groups):
        for r0 in range(g * per, (g + 1) * per, step):
            yield g, slice(r0, min(r0 + step, (g + 1) * per))


RESIDUAL_CHUNK = 1 << 16  # weights at a time (512 KiB of float64)


def swept_energy(q, forms, target, moment, damp: float, scale) -> float:
    """``tr(E H E^T)`` of a layer programmed with rule 24's integers ``q``, ``E = s (q - t0)``,
    from the op's ``forms`` (``d^T Hs d`` of each filter, ``d = q - t0``): ``Hs = Hd / m`` with
    ``m`` the mean of ``Hd``'s diagonal, and ``Hd - H`` is diagonal, so ``d^T H d = m forms -
    sum_k (Hd - H)[k, k] d[k]^2``. O(out K) where the products with ``H`` are O(out K^2), as
    ``residual_energy`` for rule 21 (equal to the products' value up to rounding)."""
    extra, m = damping_of_diagonal(moment, damp)
    s2 = scale.to(torch.float64).square()
    num = 0.0
    for g, rows in row_chunks(q.shape, moment.shape[0]):
        e2 = q[rows].double().sub_(target[rows]).square_()
        num += float((s2[rows] * (m[g] * forms[rows] - e2 @ extra[g])).sum())
    return num


def layer_filter_weights(layer, config, scale: torch.Tensor) -> torch.Tensor | None:
    """The filter weights rules 23 and 24 use for ``layer`` under its ``config``: None (every
    filter weighs 1) with ``lsb`` or without a write penalty, else rule 25's or rule 26's."""
    if config.filter_weight == "lsb" or config.write_penalty <= 0:
        return None
    if config.filter_weight == "scale":
        return filter_weights(scale)
    if layer.output_gain.numel() != scale.numel():
        raise ModelStateError(
            f"{layer.layer_name}: filter_weight='gain' (rule 26) weighs each filter by its output "
            "gain, and this layer has none: call crossbar_torch.calibrate_gains(model, run=...) "
            "(run returns the model's output, differentiable) before reprogram")
    return filter_weights(scale, layer.output_gain)


def filter_weights(scale: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor:
    """Rule 25's ``a`` (float64 (out,)): each filter's scale squared over the layer's median
    filter's (the lower median), both in float64. A filter's error in its own LSB is ``s**2``
    times as much in the layer's output as in the median filter's unit: weighing it so, rules
    23 and 24 save their writes on the filters whose LSB is worth least to the output. Clamped
    into [1e-12, 1e12], the ops' bounds (real layers stay far inside: 0.04 to 4e3 on mpnet).
    Rule 26 (``gain``, float64 (out,), >= 0): ``u = s**2 * gain`` over the lower median of its
    positive values, so that a filter's error is weighed by what it is worth in the model's
    output; every ``a`` is 1 when no ``u`` is positive (the layer does not reach the output)."""
    u = scale.detach().to("cpu", torch.float64) ** 2
    if gain is not None:
        u = u * gain.detach().to("cpu", torch.float64)  # gains are finite and >= 0
        positive = u[u > 0]
        if u.numel() and not positive.numel():
            return torch.ones_like(u)
    else:
        positive = u
    if u.numel() == 0:
        return u
    m = positive.sort().values[(positive.numel() - 1) // 2]
    return (u / m).clamp(1e-12, 1e12).contiguous()


def scaled_moment(moment: torch.Tensor, damp: float) -> torch.Tensor:
    """Rule 24's ``Hs`` (float64 (groups, K, K), on the host): rule 21's damped moment (a zero
    diagonal entry made 1, ``damp`` times the mean diagonal added) over the mean of its own
    diagonal, so that a weight moved by one LSB against an input of average power costs about
    1 LSB^2, the unit of ``write_penalty``."""
    h = damped_moment(moment, damp)
    if h.shape[-1] == 0:
        return h
    return h / h.diagonal(dim1=1, dim2=2).mean(dim=1)[:, None, None]


def sorted_integers(layer, config, q: torch.Tensor) -> torch.Tensor:
    """Rule 21's integers ``q`` (int32 (out, K), original order) as programming writes them:
    in sorted order, int16 (kept for every pass of the programming; rule 21's values fit 16
    bits), clamped into [-qmax, qmax]: a chosen value outside exists only for a weight whose
    every cell is held, and its cells decode to it whatever the target."""
    qmax = 2 ** (config.weight_bits - 1) - 1
    return torch.gather(q.clamp(-qmax, qmax), 1, layer.long_sort_index().cpu()).to(torch.int16)


def feedback_cells(layer, config, sorted_q: torch.Tensor) -> torch.Tensor:
    """The plain target cells (sorted order) of rule 21's integers (``sorted_integers``)."""
    return ops.encode(sorted_q.to(torch.int32), config.weight_bits, config.bits_per_cell,
                      config.encoding_id).to(layer.cells.device)


@torch.no_grad()
def weight_error(layer) -> torch.Tensor:
    """``E = W_eff - W`` of a crossbar layer, float64 ``(out, K)`` on the CPU."""
    w = layer.matrix_weight().detach().to("cpu", torch.float64)
    return layer.effective_weight().detach().to("cpu", torch.float64).reshape(w.shape) - w


@torch.no_grad()
def layer_output_energies(layer, e: torch.Tensor | None = None, noted: bool = False) -> tuple:
    """``(tr(E H E^T), tr(W H W^T))`` of a calibrated layer, with ``E = W_eff - W``
    (``weight_error``; pass ``e`` when it is at hand): the mean squared error its crossbars
    add to one output row (one token, one position) on the calibration inputs, and that row's
    mean square ((0, 0) without an input moment). ``noted``: the first from the programming's
    residuals where it noted them and nothing changed since (``residual_energy``,
    ``swept_energy``)."""
    h = layer.input_moment.detach().to("cpu", torch.float32)
    if not h.numel():
        return 0.0, 0.0
    w = layer.matrix_weight().detach().to("cpu", torch.float32)
    known = layer.noted_output_error() if noted and e is None else None
    if known is not None:  # the rows of W alone
        e = w[:0]
    elif e is None:  # in float32: rounded once where weight_error's float64 difference (exact
        # unless one weight is under 2**-29 of the other) is rounded again, and three full-size
        # float64 copies fewer (0.4 s of a reprogramming of the ViT-Base-sized model)
        e = layer.effective_weight().detach().to("cpu", torch.float32).reshape(w.shape) - w
    else:
        e = e.float()
    per = w.shape[0] // h.shape[0]
    num = den = 0.0
    for g in range(h.shape[0]):
        mine = e[g * per:(g + 1) * per]
        forms = quadratic_forms(torch.cat([mine, w[g * per:(g + 1) * per]]), h[g])
        num += float(forms[:mine.shape[0]].sum())
        den += float(forms[mine.shape[0]:].sum())
    return (num if known is None else known), den


def quadratic_forms(rows: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``r^T H r`` (float64 (n,)) of every row ``r`` of ``rows`` (float32 (n, K)), ``H``
    (float32 (K, K)) symmetric: column block by column block, each block's rows of ``H`` from
    the diagonal on, the part right of the block's square counted twice (its mirror below the
    diagonal). About half the products of ``(rows @ H) * rows`` (rule 21 stores ``H`` exactly
    symmetric). In float32 (BLAS, and each row's dot products with its block of ``rows``, whose
    sum adds an error of the order the products' own rounding has), the blocks' sums in
    float64: a ratio for warnings and the allocator. (An in-place product and two float64 sums
    per block took half as long again on the ViT-Base-sized model; float64 products took a
    quarter of its reprogramming.)"""
    k = h.shape[-1]
    out = torch.zeros(rows.shape[0], dtype=torch.float64)
    width = column_block_width(k)
    for k0 in range(0, k, width):
        k1 = min(k0 + width, k)
        prod = rows[:, k0:k1] @ h[k0:k1, k0:]  # (n, K - k0)
        out += torch.linalg.vecdot(prod[:, :k1 - k0], rows[:, k0:k1]).double()
        out += 2 * torch.linalg.vecdot(prod[:, k1 - k0:], rows[:, k1:]).double()
    return out


def layer_output_error(layer, noted: bool = False) -> float:
    """``tr(E H E^T) / tr(W H W^T)`` (layer_output_energies): the mean squared error the
    layer's crossbars add to its output on the calibration inputs, relative to the output's
    mean square (0 for a layer without an input moment)."""
    num, den = layer_output_energies(layer, noted=noted)
    return num / den if den > 0 else 0.0


def warn_output_errors(model: nn.Module, what: str = "reprogram") -> dict:
    """Name the calibrated layers whose relative output error exceeds the config's
    ``warn_output_error`` (one warning). Returns {layer name: error} of those layers."""
    import warnings
    from .nn.modules import crossbar_layers
    layers = [(n, l) for n, l in crossbar_layers(model) if l.input_moment.numel()]
    if not layers or not layers[0][1].config.warn_output_error:
        return {}
    limit = layers[0][1].config.warn_output_error
    bad = {n: e for n, e in ((n, layer_output_error(l, noted=True)) for n, l in layers)
           if e > limit}
    if bad:
        worst = sorted(bad.items(), key=lambda kv: -kv[1])[:3]
        # the advice for what the worst layers lack: rule 21, or a lighter policy under it
        from .nn.modules.state import layer_policy
        by_name = dict(layers)
        fed = all(layer_policy(by_name[n], n).feedback != "none" for n, _ in worst)
        advice = ("lighter stucking or a lower write_penalty" if fed else
                  "feedback='hessian' (rule 21) or lighter stucking")
        warnings.warn(
            f"{what}: {len(bad)} of {len(layers)} calibrated layer(s) have a relative output "
            f"error above warn_output_error={limit:g} on the calibration data (worst: "
            + ", ".join(f"{n} {e:.3g}" for n, e in worst) + "); the model may lose much of "
            f"its accuracy: consider {advice} for them (layer_overrides, rule 22)",
            UserWarning, stacklevel=3)
    return bad


def needs_moments(model: nn.Module) -> bool:
    from .nn.modules import crossbar_layers
    from .nn.modules.state import layer_policy
    return any(layer_policy(layer, name).feedback != "none"  # rule 22
               for name, layer in crossbar_layers(model))
