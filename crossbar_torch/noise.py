"""Programming error and drift of every cell (docs/semantics.md rule 19).

After programming, :func:`program_noise` replays the writes tile by tile on the physical
crossbars and gives every layer cell the draw of the physical cell it sits on for the pass of
its last write. The analog periphery (``crossbar_torch.nn.analog``) reads the result as the
layer buffers ``prog_eps`` and ``drift_nu``; the programmer (``crossbar_torch.programming``)
computes it.
"""
from __future__ import annotations

import numpy as np
import torch

from .config import CrossbarConfig
from .mapping import weight_crossbars


def crossbar_normal(cfg: CrossbarConfig, crossbar: int, *tag) -> np.ndarray:
    return np.random.default_rng([cfg.seed, crossbar, *tag]).standard_normal(
        (cfg.rows, cfg.cols))


def program_noise(cfg: CrossbarConfig, stuck_bits: torch.Tensor, placed: list) -> list:
    """The programming error ``eps_p`` and drift exponent ``nu`` of every cell of every layer.

    ``placed``: per layer, in model order, ``(geom, filter_index, order, t0, eff0, eff1)``: its
    placement, tile order, first global tile, and the levels its cells hold right after their
    tile in pass 0 and in pass 1. The writes are replayed on the physical crossbars (rule 8: a
    write is a level change), recording the pass of each cell's last write; a layer cell takes
    the draw of its physical cell for that pass, as it stands right after its own tile in
    pass 1. Returns ``[(eps float32 (out, K, c) or None, nu or None), ...]``.

    The replay is vectorized per layer (:func:`_replay_layer`): the layer's writes sorted by
    physical cell, then by tile position, give each write the level it overwrites and whether
    its cell changed so far, exactly as replaying the tiles one by one would."""
    pool, rows, cols = cfg.pool, cfg.rows, cfg.cols
    level = torch.zeros(pool * rows * cols, dtype=torch.uint8)   # physical cells, flat
    if cfg.stuck_value == 1:
        level[stuck_bits.reshape(-1)] = 1
    last = torch.full((pool * rows * cols,), -1, dtype=torch.int8)
    want_eps = bool(cfg.prog_noise)
    want_nu = bool(cfg.drift_nu or cfg.drift_nu_std)
    draws = {}

    def draw(x, t):
        if (x, t) not in draws:
            draws[x, t] = torch.from_numpy(crossbar_normal(cfg, x, t, 1)).to(torch.float32)
        return draws[x, t]

    result = [[None, None] for _ in placed]
    if want_eps:  # the pass of each cell's last write matters only for eps
        writes = [_layer_writes(cfg, geom, index, order, t0)
                  for geom, index, order, t0, _, _ in placed]
        for pass_no in (0, 1):
            for li, (geom, _, _, _, eff0, eff1) in enumerate(placed):
                eff = (eff0 if pass_no == 0 else eff1).cpu()
                eps = _replay_layer(writes[li], eff, level, last, pass_no, draw,
                                    rows * cols, pass_no == 1)
                if eps is not None:
                    result[li][0] = eps
    if want_nu:
        for li, (geom, index, order, t0, _, _) in enumerate(placed):
            out, K, c = geom.out, geom.k, geom.c
            crossbar, row, col0 = weight_crossbars(geom, index, order, t0, pool)
            nu = torch.zeros(out, K, c, dtype=torch.float64)
            for x in crossbar.unique().tolist():
                z = torch.from_numpy(crossbar_normal(cfg, x, 2))
                cols_ = col0[:, None] + torch.arange(c)[None, :]              # (out, c)
                val = z[row[None, :, None], cols_[:, None, :]]                # (out, K, c)
                nu = torch.where((crossbar == x)[:, :, None], val, nu)
            # float64, then stored as float32 (the buffer's dtype)
            result[li][1] = torch.clamp(cfg.drift_nu + cfg.drift_nu_std * nu, min=0).to(
                torch.float32)
    return [tuple(r) for r in result]


def _layer_writes(cfg: CrossbarConfig, geom, index: torch.Tensor, order: torch.Tensor,
                  t0: int) -> "dict | None":
    """Where and in which order a layer's weights are written (rule 5, the tile order and the
    pool), as the replay needs it: for the weights (o, k) of the layer (flat ``o * K + k``)
    sorted by physical cell of their cell 0, then by the position of their tile in the order:
    ``perm`` (that sort); ``first`` / ``last`` (the positions of the first / last write of
    each physical weight slot in the layer) and ``pid_first`` / ``pid_last`` (its physical
    cell 0, flat over (pool, rows, cols): cell ``j`` of the weight is ``pid + j``); ``group``
    (each write's slot) and ``group_start`` (the position of its slot's first write);
    ``crossbars`` (those used) and ``local`` (cell 0 in the table of their draws). Cells ``j``
    of different weights never share a column with a cell ``j'`` of another when ``j != j'``,
    so one sort serves every cell of the weight."""
    out, K, c, F, nb = geom.out, geom.k, geom.c, geom.F, geom.n_blocks
    if not out or not K:
        return None
    index = index.cpu().to(torch.int64)
    order = torch.as_tensor(order).cpu().to(torch.int64)
    slot_of = torch.full((out,), -1, dtype=torch.int64)
    used = (index >= 0).nonzero().flatten()
    slot_of[index[used]] = used                                   # filter -> j * F + f
    if bool((slot_of < 0).any()):
        raise RuntimeError("program_noise: a filter of the layer has no slot in its placement")
    block, col0 = slot_of // F, (slot_of % F) * c                 # (out,)
    position = torch.full((geom.tiles,), -1, dtype=torch.int64)   # tile id -> place in order
    position[order] = torch.arange(order.numel())
    kk = torch.arange(K)
    tile = (kk // geom.rows)[None, :] * nb + block[:, None]       # (out, K)
    p = position.index_select(0, tile.reshape(-1))  # index_select: several times faster than []
    if bool((p < 0).any()):
        raise RuntimeError("program_noise: the tile order leaves out a tile of the layer")
    x = (t0 + p) % cfg.pool
    pid = ((x.view(out, K) * geom.rows + (kk % geom.rows)[None, :]) * cfg.cols
           + col0[:, None]).reshape(-1)                           # (out * K,)
    perm = torch.argsort(pid * order.numel() + p)                 # by cell, then by tile
    spid = pid.index_select(0, perm)
    first = torch.ones_like(spid, dtype=torch.bool)
    first[1:] = spid[1:] != spid[:-1]
    last_ = torch.ones_like(first)
    last_[:-1] = first[1:]
    start = first.nonzero().flatten()                             # each cell's first write
    group = torch.cumsum(first.to(torch.int64), 0) - 1
    xs = spid // (geom.rows * cfg.cols)
    ux = (torch.bincount(xs, minlength=cfg.pool) > 0).nonzero().flatten()  # crossbars used
    slot = torch.zeros(cfg.pool, dtype=torch.int64)
    slot[ux] = torch.arange(ux.numel())
    ends = last_.nonzero().flatten()
    return {"perm": perm, "first": start, "last": ends, "group": group,
            "group_start": start.index_select(0, group),
            "pid_first": spid.index_select(0, start), "pid_last": spid.index_select(0, ends),
            "crossbars": ux.tolist(),
            "local": spid + (slot.index_select(0, xs) - xs) * (geom.rows * cfg.cols)}


def _replay_layer(w, eff: torch.Tensor, level: torch.Tensor, last: torch.Tensor, pass_no: int,
                  draw, cells_per_crossbar: int, want_eps: bool):
    """Replay one layer's writes of one pass on the physical cells (``level`` / ``last``,
    flat, updated in place); with ``want_eps`` return its eps (out, K, c) float32. A weight's
    ``c`` cells are consecutive physical cells, so the physical tensors are read as rows of
    ``c`` (``unfold``) and gathered with index_select (several times faster than ``t[idx]``)."""
    if w is None:
        return torch.zeros(eff.shape, dtype=torch.float32) if want_eps else None
    out, K, c = eff.shape
    first, last_ = w["first"], w["last"]

    def rows_at(t, pid):  # the c cells from each pid on: (len(pid), c)
        return t.unfold(0, c, 1).index_select(0, pid)

    def cells(pid):  # flat indices of those cells
        return (pid[:, None] + torch.arange(c)[None, :]).reshape(-1)
    v = eff.reshape(out * K, c).index_select(0, w["perm"]).to(level.dtype)  # replay order
    before = torch.empty_like(v)
    before[1:] = v[:-1]
    before.index_copy_(0, first, rows_at(level, w["pid_first"]))  # what a first write meets
    cs = torch.zeros(v.shape[0] + 1, c, dtype=torch.int32)     # changes so far, per column
    torch.cumsum((v != before).to(torch.int32), 0, out=cs[1:])
    changed = cs[1:] > cs.index_select(0, w["group_start"])    # ... since the layer began
    held = rows_at(last, w["pid_first"]).index_select(0, w["group"])  # unchanged: as it was
    cur = torch.where(changed, torch.tensor(pass_no, dtype=last.dtype), held)
    ends = cells(w["pid_last"])                                # pass of the cell's last write
    level.index_copy_(0, ends, v.index_select(0, last_).reshape(-1))
    last.index_copy_(0, ends, cur.index_select(0, last_).reshape(-1))
    if not want_eps:
        return None
    # the draws of the layer's crossbars for passes 0 and 1; a cell never written has none
    e = torch.zeros(v.shape, dtype=torch.float32)
    for t in (0, 1):
        table = torch.cat([draw(x, t).reshape(-1) for x in w["crossbars"]])
        e = torch.where(cur == t, rows_at(table, w["local"]), e)
    eps = torch.empty_like(e)
    eps.index_copy_(0, w["perm"], e)
    return eps.reshape(out, K, c)

