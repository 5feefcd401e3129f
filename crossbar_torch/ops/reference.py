"""Plain-PyTorch reference implementations of every ``crossbar_torch`` op.

These are written for clarity, one cell at a time where that is clearest (as tensors), and are
the yardstick the C++ / CUDA kernels are held to, exactly. They follow docs/semantics.md.

Conventions shared with the kernels (csrc/):

* ``encoding`` is an int: 0 differential, 1 twos_complement, 2 offset.
* Cell levels are ``uint8`` with a trailing cell axis of length ``c`` (cells per weight); the
  cell axis is little end first, and for differential the ``S`` positive slices come first,
  then the ``S`` negative ones.
* Crossbar state is *packed*: ``state`` is int64 ``(pool, rows, bits_per_cell, words)`` with
  ``words = ceil(cols / 64)``; bit ``j`` of word ``w`` in plane ``p`` is bit ``p`` of the level
  of column ``64 * w + j``. ``written`` and ``stuck`` are int64 ``(pool, rows, words)`` bit
  masks in the same column layout.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch

# The packed layout and the quantizer are shared conventions, not semantics under test.
from ..encoding import cells_for, slices_for  # noqa: F401
from ..mapping import column_slices, pack_bits, words_for  # noqa: F401
from . import STAT_NAMES  # noqa: F401
from ..quantization import quantize_rows as quantize  # noqa: F401
from ..quantization import quantize_with_scale  # noqa: F401

DIFFERENTIAL, TWOS_COMPLEMENT, OFFSET = 0, 1, 2
NOT_PINNED = 255


def sort_index(key: torch.Tensor) -> torch.Tensor:
    """Rule 4's order per row: stable descending sort of the int32 keys (comparison sort)."""
    return torch.sort(key, dim=1, descending=True, stable=True).indices


def encode(q: torch.Tensor, weight_bits: int, bits_per_cell: int, encoding: int) -> torch.Tensor:
    """Rule 3: integer weights (any shape, int32) -> cell levels uint8 (*shape, c)."""
    B, b = weight_bits, bits_per_cell
    qmax = 2 ** (B - 1) - 1
    q = q.to(torch.int64)
    if q.numel() and (q.min() < -qmax or q.max() > qmax):
        raise ValueError(f"q out of the symmetric range [-{qmax}, {qmax}]")
    S = slices_for(B, b, encoding)
    mask = (1 << b) - 1
    shifts = torch.arange(S, dtype=torch.int64) * b

    def split(word):
        return (word.unsqueeze(-1) >> shifts) & mask

    if encoding == DIFFERENTIAL:
        cells = torch.cat([split(q.clamp(min=0)), split((-q).clamp(min=0))], dim=-1)
    elif encoding == TWOS_COMPLEMENT:
        cells = split(q & ((1 << B) - 1))
    elif encoding == OFFSET:
        cells = split(q + qmax)
    else:
        raise ValueError(f"unknown encoding {encoding}")
    return cells.to(torch.uint8).contiguous()


def decode(cells: torch.Tensor, weight_bits: int, bits_per_cell: int, encoding: int) -> torch.Tensor:
    """Rule 3 / 9: cell levels (*shape, c) -> integer q int32 (*shape). Never clamps."""
    B, b = weight_bits, bits_per_cell
    S = slices_for(B, b, encoding)
    shifts = torch.arange(S, dtype=torch.int64) * b
    levels = cells.to(torch.int64)
    if encoding == DIFFERENTIAL:
        pos = (levels[..., :S] << shifts).sum(-1)
        neg = (levels[..., S:] << shifts).sum(-1)
        q = pos - neg
    elif encoding == TWOS_COMPLEMENT:
        w = (levels << shifts).sum(-1)
        q = w - 2 * (w & (1 << (B - 1)))  # the top bit weighs -2**(B-1)
    elif encoding == OFFSET:
        q = (levels << shifts).sum(-1) - (2 ** (B - 1) - 1)
    else:
        raise ValueError(f"unknown encoding {encoding}")
    return q.to(torch.int32)


def effective_weight(cells: torch.Tensor, index: torch.Tensor, scale: torch.Tensor,
                     weight_bits: int, bits_per_cell: int, encoding: int) -> torch.Tensor:
    """Rule 9: decode the sorted cells (out, K, c), scatter back through the sort index
    (position k' holds original weight index[o, k']) and multiply by the row scale.
    Returns float32 (out, K)."""
    q_sorted = decode(cells, weight_bits, bits_per_cell, encoding).to(torch.float32)
    w_sorted = q_sorted * scale.to(torch.float32)[:, None]
    out = torch.empty_like(w_sorted)
    out.scatter_(1, index.to(torch.int64), w_sorted)
    return out


def sort_and_encode(w: torch.Tensor, scale: torch.Tensor, index: torch.Tensor,
                    weight_bits: int, bits_per_cell: int, encoding: int) -> torch.Tensor:
    """Target cells of a layer: quantize ``w`` (out, K) with the fixed scales, gather through
    the sort index, encode. Returns uint8 (out, K, c)."""
    q = quantize_with_scale(w, scale, weight_bits)
    q_sorted = torch.gather(q, 1, index.to(torch.int64))
    return encode(q_sorted, weight_bits, bits_per_cell, encoding)


# ----------------------------------------------------------------------------------------
# Programming and transition counting (rules 5 to 8)
# ----------------------------------------------------------------------------------------

def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """int64 (..., words) -> bool (..., cols)."""
    bits = torch.arange(64, dtype=torch.int64)
    out = ((packed.unsqueeze(-1) >> bits) & 1).bool()
    return out.reshape(*packed.shape[:-1], -1)[..., :cols]


def unpack_levels(state: torch.Tensor, cols: int) -> torch.Tensor:
    """(pool, rows, planes, words) -> int64 levels (pool, rows, cols)."""
    planes = unpack_bits(state, cols).to(torch.int64)  # (pool, rows, planes, cols)
    weights = (1 << torch.arange(state.shape[2], dtype=torch.int64))[:, None]
    return (planes * weights).sum(2)


def pack_levels(levels: torch.Tensor, planes: int) -> torch.Tensor:
    """int64 levels (pool, rows, cols) -> (pool, rows, planes, words)."""
    return torch.stack([pack_bits(((levels >> p) & 1).bool()) for p in range(planes)], dim=2)


def chain_order(bits: torch.Tensor, start: int) -> torch.Tensor:
    """The nearest-neighbour chain over the rows of ``bits`` (int64 (out, W) packed words) from
    row ``start``, from the full distance matrix: unpack the bits, Hamming distance of rows a, b
    = |a| + |b| - 2 a.b (exact integers), then repeatedly the unvisited row nearest the last
    one, ties to the lowest row."""
    out = bits.shape[0]
    if out == 0:
        return torch.zeros(0, dtype=torch.int64)
    b = unpack_bits(bits, 64 * bits.shape[1]).to(torch.int64)
    ones = b.sum(1)
    dist = ones[:, None] + ones[None, :] - 2 * (b @ b.T)
    visited = torch.zeros(out, dtype=torch.bool)
    order = [int(start)]
    visited[start] = True
    for _ in range(out - 1):
        d = dist[order[-1]].masked_fill(visited, torch.iinfo(torch.int64).max)
        nxt = int(torch.argmin(d))  # first minimum: the lowest row
        order.append(nxt)
        visited[nxt] = True
    return torch.tensor(order, dtype=torch.int64)


def _decode_levels(levels, weight_bits, bits_per_cell, encoding) -> int:
    return int(decode(torch.tensor([list(levels)], dtype=torch.uint8), weight_bits,
                      bits_per_cell, encoding)[0])


def _encode_high(h, weight_bits, bits_per_cell, encoding, L):
    """{cell: level} of the slices >= L holding the rule-3 encoding of the high part h."""
    S = slices_for(weight_bits, bits_per_cell, encoding)
    b, mask = bits_per_cell, (1 << bits_per_cell) - 1
    out = {}
    if L >= S:
        return out
    if encoding == DIFFERENTIAL:
        for i in range(L, S):
            out[i] = (max(h, 0) >> ((i - L) * b)) & mask
            out[S + i] = (max(-h, 0) >> ((i - L) * b)) & mask
    else:
        hbits = weight_bits - L * b
        word = h % (1 << hbits) if encoding == TWOS_COMPLEMENT else h
        for i in range(L, S):
            out[i] = (word >> ((i - L) * b)) & mask
    return out


def _high_range(weight_bits, bits_per_cell, encoding, L):
    S = slices_for(weight_bits, bits_per_cell, encoding)
    if L >= S:
        return 0, 0
    hbits = (weight_bits - 1 if encoding == DIFFERENTIAL else weight_bits) - L * bits_per_cell
    if encoding == DIFFERENTIAL:
        return -(2 ** hbits - 1), 2 ** hbits - 1
    if encoding == TWOS_COMPLEMENT:
        return -(2 ** (hbits - 1)), 2 ** (hbits - 1) - 1
    return 0, 2 ** hbits - 1


def compensate_weight(q, old, fixed, weight_bits, bits_per_cell, encoding, L):
    """Rule 13 for one weight. ``old``: its cells' current levels; ``fixed``: {cell: level}
    of the cells that take no search level. Returns the levels of its c cells."""
    S = slices_for(weight_bits, bits_per_cell, encoding)
    c = len(old)
    L = min(L, S)
    m = L * bits_per_cell
    hmin, hmax = _high_range(weight_bits, bits_per_cell, encoding, L)
    free = [i for i in range(c) if i not in fixed and i % S < L]
    levels = 2 ** bits_per_cell
    best = None
    for x in range(levels ** len(free)):
        cells = [0] * c
        for i, v in fixed.items():
            if i % S < L:
                cells[i] = v
        for k, i in enumerate(free):
            cells[i] = (x // levels ** k) % levels
        d = _decode_levels(cells, weight_bits, bits_per_cell, encoding)
        h = min(hmax, max(hmin, round(Fraction(q - d, 2 ** m)))) if hmax > hmin else 0
        err = abs(h * 2 ** m + d - q)
        high = _encode_high(h, weight_bits, bits_per_cell, encoding, L)
        writes = sum(cells[i] != old[i] for i in free) + sum(v != old[i] for i, v in high.items())
        if best is None or (err, writes) < best[:2]:
            best = (err, writes, cells, high)
    cells, high = best[2], best[3]
    for i, v in fixed.items():
        cells[i] = v
    for i, v in high.items():  # (a fixed cell is never in a high slice)
        cells[i] = v
    return cells


def compensate(cells: torch.Tensor, held: torch.Tensor, old: torch.Tensor, weight_bits: int,
               bits_per_cell: int, encoding: int, compensate_slices: int) -> torch.Tensor:
    """Per weight (trailing cell axis): held cells keep ``old``; a weight with a held cell and
    ``compensate_slices`` > 0 gets rule 13 against the value its plain targets ``cells`` encode
    (write tie-break against ``old``); the others take their targets."""
    c = cells.shape[-1]
    flat_c, flat_h, flat_o = (t.reshape(-1, c).tolist() for t in (cells, held, old))
    result = []
    for tgt, h, o in zip(flat_c, flat_h, flat_o):
        if compensate_slices > 0 and any(h):
            q = _decode_levels(tgt, weight_bits, bits_per_cell, encoding)
            fixed = {i: o[i] for i in range(c) if h[i]}
            result.append(compensate_weight(q, o, fixed, weight_bits, bits_per_cell, encoding,
                                            compensate_slices))
        else:
            result.append([o[i] if h[i] else tgt[i] for i in range(c)])
    return torch.tensor(result, dtype=torch.uint8).reshape(cells.shape)


def program_layer(cells: torch.Tensor, filter_index: torch.Tensor, order: torch.Tensor,
                  pinned: torch.Tensor, state: torch.Tensor, written: torch.Tensor,
                  stuck: torch.Tensor, cell_writes: torch.Tensor, tile_offset: int, rows: int,
                  cols: int, weight_bits: int, bits_per_cell: int, encoding: int,
                  stuck_initial: bool, count_cells: bool, compensate_slices: int = 0,
                  window: int = 0):
    """Program every tile of one layer onto the pool; update the state in place and return
    ``(effective_cells, stats, order)``.

    * ``cells``: plain target levels uint8 (out, K, c) in sorted (programmed) order.
    * ``filter_index`` (rule 11): slot f of column block j holds filter ``filter_index[j*F+f]``
      (-1: unused slot, its cells are don't care); empty means natural (o in block o // F).
    * Tile id ``s * n_blocks + j`` holds section s (rows ``k' = s*rows ..``) of block j. The
      tile at position p of the order is global tile ``tile_offset + p`` on crossbar
      ``(tile_offset + p) % pool``. ``order`` given: replayed; empty: section-major when
      ``window`` is 0, else greedy (rule 12): at each step, among the first ``window``
      unprogrammed tiles (by id), the one whose covered cells' plain targets differ from the
      crossbar's current levels in the fewest cells, ties to the smallest id.
    * A stuck cell is never reprogrammed. With ``stuck_initial`` the first tile that covers it
      writes it (tracked in ``written``), later ones don't; otherwise it holds the level the
      caller put in ``state`` and is never written. ``pinned`` (uint8 like cells, or empty):
      the level a cell on a stuck position is known to hold (255: unknown); its first write
      writes that level.
    * ``compensate_slices`` = L > 0 (rule 13): a weight with a held cell (one that keeps its
      level now) gets, in its free cells of slices < L, the levels that decode closest to its
      q (the value of its plain targets), the high slices in closed form; ties: fewest writes,
      then the smallest assignment (first free cell least significant).
    * ``stats`` int64: writes, SETs, RESETs, pulses (sum |new - old|), rows programmed (a tile
      row with at least one write), SET pulses (sum of new - old where new > old), then
      writes per slice.
    * ``effective_cells``: what the cells hold right after their tile was programmed.
    * If ``count_cells``, ``cell_writes`` (int32, (pool, rows, cols)) gets +1 per written cell.
    """
    out, K, c = cells.shape
    S = slices_for(weight_bits, bits_per_cell, encoding)
    pool = state.shape[0]
    F = cols // c
    nb = math.ceil(out / F) if out else 0
    ns = math.ceil(K / rows) if K else 0
    tiles = nb * ns
    if filter_index.numel() == 0:
        filter_index = torch.tensor(list(range(out)) + [-1] * (nb * F - out), dtype=torch.int64)
    slot_filter = filter_index.cpu().reshape(nb, F) if nb else filter_index.reshape(0, F)
    lv = unpack_levels(state.cpu(), cols)
    wr = unpack_bits(written.cpu(), cols)
    st = unpack_bits(stuck.cpu(), cols)
    col_slice = column_slices(cols, c, S)
    stats = torch.zeros(len(STAT_NAMES) + S, dtype=torch.int64)
    eff = cells.clone()
    has_pin = pinned.numel() > 0

    def tile_layout(t):
        """Targets, covered mask and pinned levels of tile t as (nr, cols) matrices."""
        s, j = divmod(t, nb)
        k0, k1 = s * rows, min(K, (s + 1) * rows)
        tgt = torch.zeros(k1 - k0, cols, dtype=torch.int64)
        cov = torch.zeros(k1 - k0, cols, dtype=torch.bool)
        pin = torch.full((k1 - k0, cols), NOT_PINNED, dtype=torch.int64)
        slots = []
        for f in range(F):
            o = int(slot_filter[j, f])
            if o < 0:
                continue
            slots.append((f, o))
            tgt[:, f * c:(f + 1) * c] = cells[o, k0:k1].to(torch.int64)
            cov[:, f * c:(f + 1) * c] = True
            if has_pin:
                pin[:, f * c:(f + 1) * c] = pinned[o, k0:k1].to(torch.int64)
        return k0, k1, tgt, cov, pin, slots

    def program(t, x):
        k0, k1, tgt, cov, pin, slots = tile_layout(t)
        nr = k1 - k0
        old = lv[x, :nr].clone()
        stk = st[x, :nr]
        if stuck_initial:
            allowed = cov & (~stk | ~wr[x, :nr])
            wr[x, :nr] |= cov
        else:
            allowed = cov & ~stk
        want = tgt.clone()
        pinned_here = cov & stk & (pin != NOT_PINNED)
        want[pinned_here] = pin[pinned_here]
        if compensate_slices > 0:
            held = cov & ~allowed
            for r in range(nr):
                for f, o in slots:
                    cs = slice(f * c, (f + 1) * c)
                    if not held[r, cs].any():
                        continue
                    q = _decode_levels(tgt[r, cs].tolist(), weight_bits, bits_per_cell, encoding)
                    fixed = {i: int(old[r, f * c + i]) if held[r, f * c + i]
                             else int(want[r, f * c + i]) for i in range(c)
                             if held[r, f * c + i] or pinned_here[r, f * c + i]}
                    want[r, cs] = torch.tensor(compensate_weight(
                        q, old[r, cs].tolist(), fixed, weight_bits, bits_per_cell, encoding,
                        compensate_slices))
        new = torch.where(allowed, want, old)
        changed = new != old
        stats[0] += changed.sum()
        stats[1] += (new > old).sum()
        stats[2] += (new < old).sum()
        stats[3] += (new - old).abs().sum()
        stats[4] += changed.any(dim=1).sum()
        stats[5] += (new - old).clamp(min=0).sum()
        for sl in range(S):
            stats[len(STAT_NAMES) + sl] += changed[:, col_slice == sl].sum()
        if count_cells:
            cell_writes[x, :nr] += changed.to(cell_writes.dtype).to(cell_writes.device)
        lv[x, :nr] = new
        for f, o in slots:
            eff[o, k0:k1] = new[:, f * c:(f + 1) * c].to(torch.uint8)

    if order.numel():
        chosen = [int(t) for t in order.cpu()]
        for p, t in enumerate(chosen):
            program(t, (tile_offset + p) % pool)
    elif window == 0:
        chosen = list(range(tiles))
        for p, t in enumerate(chosen):
            program(t, (tile_offset + p) % pool)
    else:
        chosen, remaining = [], list(range(tiles))
        for p in range(tiles):
            x = (tile_offset + p) % pool

            def distance(t):
                k0, k1, tgt, cov, _, _ = tile_layout(t)
                return int(((tgt != lv[x, :k1 - k0]) & cov).sum())

            dist = [distance(t) for t in remaining[:window]]
            t = remaining.pop(dist.index(min(dist)))  # first minimum: the smallest id
            chosen.append(t)
            program(t, x)
    state.copy_(pack_levels(lv, state.shape[2]).to(state.device))
    written.copy_(pack_bits(wr).to(written.device))
    return eff, stats, torch.tensor(chosen, dtype=torch.int64)

