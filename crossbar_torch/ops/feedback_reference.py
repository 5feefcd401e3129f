"""Plain-PyTorch reference of rule 21 (error feedback) and rule 23 (write-aware feedback): the
``feedback_quantize`` op, one weight at a time, held to the kernels exactly (the shared
helpers of :mod:`crossbar_torch.ops.reference` do the encoding)."""
from __future__ import annotations

import torch

from .reference import (_decode_levels, _encode_high, _high_range, cells_for, encode,
                        slices_for)

REFINE_WINDOW = 3  # rule 24: a sweep moves a weight by at most this many LSB


def _feedback_better(a: int, b: int, t: float) -> bool:
    da, db = abs(float(a) - t), abs(float(b) - t)
    if da != db:
        return da < db
    if (a % 2 == 0) != (b % 2 == 0):
        return a % 2 == 0
    return a < b


def nearest_allowed(t: float, levels, held, weight_bits: int, bits_per_cell: int,
                    encoding: int, L: int) -> int:
    """Rule 21: the value nearest ``t`` that a weight decodes to with its ``held`` cells at
    ``levels`` (ties: the even value, then the smaller), among [-qmax, qmax] when any is
    reachable there, else among every decodable value."""
    qmax = 2 ** (weight_bits - 1) - 1
    if not any(held):
        v = round(t)  # Python rounds half to even
        return min(qmax, max(-qmax, v))
    S = slices_for(weight_bits, bits_per_cell, encoding)
    L = min(L, S)
    m, c = L * bits_per_cell, len(levels)
    hmin, hmax = _high_range(weight_bits, bits_per_cell, encoding, L)
    free = [i for i in range(c) if not held[i] and i % S < L]
    n = 2 ** bits_per_cell
    best_in = best_any = None
    for x in range(n ** len(free)):
        cells = [levels[i] if held[i] and i % S < L else 0 for i in range(c)]
        for k, i in enumerate(free):
            cells[i] = (x // n ** k) % n
        d = _decode_levels(cells, weight_bits, bits_per_cell, encoding)
        for h in range(hmin, hmax + 1):
            v = h * 2 ** m + d
            if best_any is None or _feedback_better(v, best_any, t):
                best_any = v
            if -qmax <= v <= qmax and (best_in is None or _feedback_better(v, best_in, t)):
                best_in = v
    return best_in if best_in is not None else best_any


def write_aware_allowed(t: float, levels, held, ref, penalty: float, weight_bits: int,
                        bits_per_cell: int, encoding: int, L: int):
    """Rule 23: (value, cells) of the realization minimising ``(t - v)**2 + penalty * w``, ``w``
    the cells not held whose level differs from ``ref`` (no ``ref``: 0), over rule 21's allowed
    values and every way to reach each (every free low assignment x, every high part h; without
    held cells the rule-3 encoding of every integer of [-qmax, qmax]). Ties: nearer t, even,
    smaller value, then smaller x."""
    qmax = 2 ** (weight_bits - 1) - 1
    S = slices_for(weight_bits, bits_per_cell, encoding)
    c = cells_for(weight_bits, bits_per_cell, encoding)
    held = list(held) if held is not None else [False] * c

    def cost(v, cells):
        w = sum(1 for i in range(c) if not held[i] and cells[i] != ref[i]) if ref else 0
        e = t - float(v)
        return e * e + penalty * float(w)

    cands = []  # (value, cells) in increasing x, then increasing h
    if not any(held):
        for v in range(-qmax, qmax + 1):
            cells = encode(torch.tensor([v], dtype=torch.int32), weight_bits, bits_per_cell,
                           encoding)[0].tolist()
            cands.append((v, cells))
    else:
        L = min(L, S)
        m = L * bits_per_cell
        hmin, hmax = _high_range(weight_bits, bits_per_cell, encoding, L)
        free = [i for i in range(c) if not held[i] and i % S < L]
        n = 2 ** bits_per_cell
        for x in range(n ** len(free)):
            low = [levels[i] if held[i] and i % S < L else 0 for i in range(c)]
            for k, i in enumerate(free):
                low[i] = (x // n ** k) % n
            d = _decode_levels(low, weight_bits, bits_per_cell, encoding)
            for h in range(hmin, hmax + 1):
                cells = list(low)
                for i, lvl in _encode_high(h, weight_bits, bits_per_cell, encoding, L).items():
                    cells[i] = lvl
                cands.append((h * 2 ** m + d, cells))
        inside = [vc for vc in cands if -qmax <= vc[0] <= qmax]
        cands = inside or cands
    best = None
    for v, cells in cands:
        k = cost(v, cells)
        if (best is None or k < best[0]
                or (k == best[0] and v != best[1] and _feedback_better(v, best[1], t))):
            best = (k, v, cells)
    return best[1], best[2]


def feedback_quantize(target: torch.Tensor, u: torch.Tensor, held: torch.Tensor,
                      levels: torch.Tensor, weight_bits: int, bits_per_cell: int, encoding: int,
                      stuck_slices: int, pred: torch.Tensor | None = None,
                      index: torch.Tensor | None = None,
                      write_penalty: float = 0.0,
                      filter_weight: torch.Tensor | None = None, running: bool = False):
    """Rule 21, column by column for all filters at once: each weight takes the allowed value
    nearest its running target, and its error against its own target, ``v - target[o, k]``, is
    carried onto the later columns through row k of ``u`` (``t[j] -= e * u[k, j]``, each
    product rounded on its own, as the kernels do; ``u``'s diagonal is not read). With
    rule 23's ``write_penalty`` > 0, one filter at a time, each after its ``pred``; rule 25's
    ``filter_weight`` (float64 (out,)) makes filter o pay ``write_penalty / filter_weight[o]``.
    ``running``: also the running targets (each weight's when it was chosen)."""
    if write_penalty > 0:
        q, t = _write_aware_quantize(target, u, held, levels, weight_bits, bits_per_cell,
                                     encoding, stuck_slices, pred, index, write_penalty,
                                     filter_weight)
        return (q, t) if running else q
    t0 = target.detach().to(torch.float64)
    t = t0.clone()
    out, K = t.shape
    groups = u.shape[0]
    per = out // groups if groups else 0
    q = torch.zeros(out, K, dtype=torch.int32)
    if out == 0 or K == 0:
        return (q, t) if running else q
    rows_u = u.to(torch.float64)[torch.arange(out) // per]  # (out, K, K)
    hl = held.tolist() if held.numel() else None
    lv = levels.tolist() if levels.numel() else None
    for k in range(K):
        v = torch.tensor([nearest_allowed(float(t[o, k]), lv[o][k] if lv else None,
                                          hl[o][k] if hl else [False], weight_bits,
                                          bits_per_cell, encoding, stuck_slices)
                          for o in range(out)], dtype=torch.float64)
        q[:, k] = v.to(torch.int32)
        e = v - t0[:, k]
        t[:, k + 1:] = t[:, k + 1:] - e[:, None] * rows_u[:, k, k + 1:]
    return (q, t) if running else q


def _write_aware_quantize(target, u, held, levels, weight_bits, bits_per_cell, encoding,
                          stuck_slices, pred, sort_order, penalty, filter_weight=None):
    """Rule 23: filters in an order where each comes after its predecessor ``pred[o]``; weight
    k of filter o is charged against the cells its predecessor chose at o's sorted position of
    k (``sort_order``: the layer's sort index)."""
    t0 = target.detach().to(torch.float64)
    t = t0.clone()
    out, K = t.shape
    q = torch.zeros(out, K, dtype=torch.int32)
    if out == 0 or K == 0:
        return q, t
    per = out // u.shape[0]
    pred = [int(p) for p in pred.tolist()]
    index = sort_order.tolist()
    hl = held.tolist() if held.numel() else None
    lv = levels.tolist() if levels.numel() else None
    chosen = {}  # filter -> cells by sorted position
    todo = [o for o in range(out) if pred[o] < 0]
    while todo:
        o = todo.pop(0)
        uo = u[o // per].to(torch.float64)
        pos = {k: p for p, k in enumerate(index[o])}
        ref = chosen.get(pred[o])
        lam = penalty if filter_weight is None else penalty / float(filter_weight[o])
        mine = [None] * K
        for k in range(K):
            v, cells = write_aware_allowed(
                float(t[o, k]), lv[o][k] if lv else None, hl[o][k] if hl else None,
                ref[pos[k]] if ref is not None else None, lam, weight_bits, bits_per_cell,
                encoding, stuck_slices)
            q[o, k] = v
            mine[pos[k]] = cells
            e = float(v) - float(t0[o, k])
            t[o, k + 1:] = t[o, k + 1:] - e * uo[k, k + 1:]
        chosen[o] = mine
        todo.extend(x for x in range(out) if pred[x] == o)
    return q, t


def chain_depths(pred: list) -> list:
    """Rule 24: each filter's depth in its rule-23 chain (0 without a predecessor)."""
    depth = [None] * len(pred)

    def of(o):
        if depth[o] is None:
            depth[o] = 0 if pred[o] < 0 else of(pred[o]) + 1
        return depth[o]
    return [of(o) for o in range(len(pred))]


def feedback_refine(target: torch.Tensor, hs: torch.Tensor, q: torch.Tensor, pred: torch.Tensor,
                    index: torch.Tensor, weight_bits: int, bits_per_cell: int, encoding: int,
                    write_penalty: float, sweeps: int,
                    filter_weight: torch.Tensor | None = None, forms: bool = False):
    """Rule 24: ``sweeps`` sweeps of coordinate descent on ``J`` from rule 21's / 23's ``q``
    (int32 (out, K), original order); ``target`` float64 (out, K), ``hs`` the scaled moment
    float64 (groups, K, K), ``pred`` int64 (out,) rule 23's predecessors, ``index`` the sort
    index. Each half (even / odd depth) goes position by position, its filters side by side
    (independent: their write terms involve the other half only); every product is rounded on
    its own, as the kernels compute. Rule 25's ``filter_weight`` (float64 (out,)) multiplies
    filter o's error part of the cost. Returns the refined integers; with ``forms``, also each
    filter's ``sum_k d[k] g[k]`` (float64 (out,), summed in increasing k; empty without a
    sweep), ``d = q - target`` and ``g`` the running ``d Hs`` as the sweeps leave them (what
    the op computes)."""
    q = q.detach().to(torch.int64).clone()
    out, K = q.shape
    if sweeps == 0 or out == 0 or K == 0:
        sums = torch.zeros(out if sweeps else 0, dtype=torch.float64)
        return (q.to(torch.int32), sums) if forms else q.to(torch.int32)
    qmax = 2 ** (weight_bits - 1) - 1
    per = out // hs.shape[0]
    rows_h = hs.to(torch.float64)[torch.arange(out) // per]             # (out, K, K)
    table = encode(torch.arange(-qmax, qmax + 1, dtype=torch.int32), weight_bits,
                   bits_per_cell, encoding).to(torch.int64)             # (2 qmax + 1, c)
    pred_l = [int(x) for x in pred.tolist()]
    succ_l = [-1] * out
    for o, r in enumerate(pred_l):
        if r >= 0:
            succ_l[r] = o
    depth = chain_depths(pred_l)
    d = q.to(torch.float64) - target.to(torch.float64)
    g = torch.zeros(out, K, dtype=torch.float64)
    for k in range(K):  # increasing k, each product rounded, then added
        g = g + d[:, k:k + 1] * rows_h[:, k, :]
    idx = index.to(torch.int64)
    fw = None if filter_weight is None else filter_weight.to(torch.float64)
    deltas = [x for x in range(-REFINE_WINDOW, REFINE_WINDOW + 1) if x != 0]
    deltas.sort(key=lambda x: (abs(x), x))  # the tie order: smaller |delta|, then negative
    for _ in range(sweeps):
        for parity in (0, 1):
            half = torch.tensor([o for o in range(out) if depth[o] % 2 == parity],
                                dtype=torch.int64)
            if not half.numel():
                continue
            nbs = []
            for links in (pred_l, succ_l):
                r = torch.tensor([links[o] for o in half.tolist()], dtype=torch.int64)
                nbs.append((r.clamp(min=0), r >= 0))
            for p in range(K):
                k = idx[half, p]
                c = q[half, k]
                gk = g[half, k]
                hkk = rows_h[half, k, k]
                own = table[c + qmax]
                ref = [table[q[r, idx[r, p]] + qmax] for r, _ in nbs]
                best = torch.zeros(half.numel(), dtype=torch.float64)
                move = torch.zeros(half.numel(), dtype=torch.int64)
                for delta in deltas:
                    v = c + delta
                    ok = (v >= -qmax) & (v <= qmax)
                    cells = table[v.clamp(-qmax, qmax) + qmax]
                    dw = torch.zeros(half.numel(), dtype=torch.int64)
                    for (r, has), rc in zip(nbs, ref):
                        diff = (cells != rc).sum(1) - (own != rc).sum(1)
                        dw = dw + torch.where(has, diff, torch.zeros_like(diff))
                    err = (2.0 * delta) * gk + float(delta * delta) * hkk
                    if fw is not None:
                        err = fw[half] * err
                    cost = err + float(write_penalty) * dw.to(torch.float64)
                    take = ok & (cost < best)  # strictly lower: the tie order is the loop's
                    best = torch.where(take, cost, best)
                    move = torch.where(take, torch.full_like(move, delta), move)
                moved = torch.nonzero(move != 0).flatten()
                if moved.numel():
                    o, kk = half[moved], k[moved]
                    dv = move[moved]
                    q[o, kk] = q[o, kk] + dv
                    g[o] = g[o] + dv.to(torch.float64)[:, None] * rows_h[o, kk, :]
    if not forms:
        return q.to(torch.int32)
    d = q.to(torch.float64) - target.to(torch.float64)
    sums = torch.zeros(out, dtype=torch.float64)
    for k in range(K):  # increasing k, each product rounded, then added
        sums = sums + d[:, k] * g[:, k]
    return q.to(torch.int32), sums
