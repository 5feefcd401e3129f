"""Plain-PyTorch reference implementations of every ``crossbar_torch`` op.

These are written for clarity, one cell at a time where that is clearest (as tensors), and are
the yardstick the C++ / CUDA kernels are held to, exactly. They follow DESIGN.md, Semantics.

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

import torch

DIFFERENTIAL, TWOS_COMPLEMENT, OFFSET = 0, 1, 2

# Order of the counters returned by program_layer (then one entry per slice).
STAT_NAMES = ("writes", "sets", "resets", "pulses", "rows_programmed")


def slices_for(weight_bits: int, bits_per_cell: int, encoding: int) -> int:
    magnitude = weight_bits - 1 if encoding == DIFFERENTIAL else weight_bits
    return math.ceil(magnitude / bits_per_cell)


def cells_for(weight_bits: int, bits_per_cell: int, encoding: int) -> int:
    s = slices_for(weight_bits, bits_per_cell, encoding)
    return 2 * s if encoding == DIFFERENTIAL else s


def quantize(w: torch.Tensor, weight_bits: int, per_channel: bool):
    """Rule 2. ``w`` is (out, K); returns (q int32 (out, K), s float32 (out,))."""
    w = w.detach().to(torch.float32)
    qmax = 2 ** (weight_bits - 1) - 1
    if per_channel:
        amax = w.abs().amax(dim=1) if w.shape[1] > 0 else torch.zeros(w.shape[0])
    else:
        amax = (w.abs().amax() if w.numel() else torch.zeros(())).expand(w.shape[0])
    s = amax / torch.tensor(qmax, dtype=torch.float32)
    # s = 1 for an all-zero row (rule 2), and also where amax / qmax underflows to 0 in
    # float32 (|w| < ~1.8e-43): such a row quantizes to zeros either way
    s = torch.where(s == 0, torch.ones_like(s), s).contiguous()
    q = torch.clamp(torch.round(w / s[:, None]), -qmax, qmax).to(torch.int32)
    return q, s


def quantize_with_scale(w: torch.Tensor, s: torch.Tensor, weight_bits: int) -> torch.Tensor:
    """Rule 2 with fixed scales (used for fine-tuned weights: scales stay fixed)."""
    qmax = 2 ** (weight_bits - 1) - 1
    w = w.to(torch.float32)
    return torch.clamp(torch.round(w / s[:, None]), -qmax, qmax).to(torch.int32)


def sort_index(q: torch.Tensor, key: str) -> torch.Tensor:
    """Rule 4: per-row stable descending order of |q| (magnitude) or q (value); int64."""
    if key == "none":
        return torch.arange(q.shape[1], dtype=torch.int64).expand(q.shape[0], -1).contiguous()
    k = q.abs() if key == "magnitude" else q
    return torch.sort(k, dim=1, descending=True, stable=True).indices.contiguous()


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

def words_for(cols: int) -> int:
    return (cols + 63) // 64


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """int64 (..., words) -> bool (..., cols)."""
    bits = torch.arange(64, dtype=torch.int64)
    out = ((packed.unsqueeze(-1) >> bits) & 1).bool()
    return out.reshape(*packed.shape[:-1], -1)[..., :cols]


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool (..., cols) -> int64 (..., words) (bit 63 lands in the sign bit)."""
    cols = bits.shape[-1]
    words = words_for(cols)
    padded = torch.zeros(*bits.shape[:-1], words * 64, dtype=torch.int64)
    padded[..., :cols] = bits.to(torch.int64)
    padded = padded.reshape(*bits.shape[:-1], words, 64)
    shifts = torch.arange(64, dtype=torch.int64)
    return (padded << shifts).sum(-1)  # wraps into the sign bit for bit 63, as intended


def unpack_levels(state: torch.Tensor, cols: int) -> torch.Tensor:
    """(pool, rows, planes, words) -> int64 levels (pool, rows, cols)."""
    planes = unpack_bits(state, cols).to(torch.int64)  # (pool, rows, planes, cols)
    weights = (1 << torch.arange(state.shape[2], dtype=torch.int64))[:, None]
    return (planes * weights).sum(2)


def pack_levels(levels: torch.Tensor, planes: int) -> torch.Tensor:
    """int64 levels (pool, rows, cols) -> (pool, rows, planes, words)."""
    return torch.stack([pack_bits(((levels >> p) & 1).bool()) for p in range(planes)], dim=2)


def column_slices(cols: int, cells_per_weight: int, slices: int) -> torch.Tensor:
    """Slice held by each physical column (-1 for columns no filter uses)."""
    F = cols // cells_per_weight
    col = torch.arange(cols)
    return torch.where(col < F * cells_per_weight, (col % cells_per_weight) % slices,
                       torch.full_like(col, -1))


def program_layer(cells: torch.Tensor, state: torch.Tensor, written: torch.Tensor,
                  stuck: torch.Tensor, cell_writes: torch.Tensor, tile_offset: int,
                  rows: int, cols: int, bits_per_cell: int, slices: int,
                  stuck_initial: bool, count_cells: bool):
    """Program every tile of one layer, in schedule order, onto the pool; update the state in
    place and return ``(effective_cells, stats)``.

    * ``cells``: target levels uint8 (out, K, c) in sorted (programmed) order.
    * Tile ``(s, j)`` (section-major: for s, for j) is global tile ``tile_offset + local`` and
      goes to crossbar ``global % pool``. Weight ``(o, k')`` of the tile sits in row
      ``k' - s*rows`` and columns ``(o mod F)*c ..``; cells the tile does not cover are
      untouched (don't care).
    * A stuck cell is never reprogrammed. With ``stuck_initial`` the first tile that covers it
      writes it (tracked in ``written``), later ones don't; otherwise it holds the level the
      caller put in ``state`` and is never written.
    * ``stats`` int64: writes, SETs, RESETs, pulses (sum |new - old|), rows programmed (a tile
      row with at least one write), then writes per slice (``slices`` entries).
    * ``effective_cells``: what the cells hold right after their tile was programmed.
    * If ``count_cells``, ``cell_writes`` (int32, (pool, rows, cols)) gets +1 per written cell.
    """
    out, K, c = cells.shape
    pool = state.shape[0]
    F = cols // c
    lv = unpack_levels(state, cols)
    wr = unpack_bits(written, cols)
    st = unpack_bits(stuck, cols)
    col_slice = column_slices(cols, c, slices)
    stats = torch.zeros(len(STAT_NAMES) + slices, dtype=torch.int64)
    eff = torch.empty_like(cells)
    n_sections = math.ceil(K / rows) if K else 0
    n_blocks = math.ceil(out / F) if out else 0
    t = tile_offset
    for s in range(n_sections):
        k0, k1 = s * rows, min(K, (s + 1) * rows)
        for j in range(n_blocks):
            o0, o1 = j * F, min(out, (j + 1) * F)
            x = t % pool
            t += 1
            nr, ncol = k1 - k0, (o1 - o0) * c
            # tile (nr, ncol): row r holds k' = k0 + r, column f*c + i holds cell i of o0 + f
            tile = cells[o0:o1, k0:k1, :].permute(1, 0, 2).reshape(nr, ncol).to(torch.int64)
            old = lv[x, :nr, :ncol]
            stk = st[x, :nr, :ncol]
            if stuck_initial:
                allowed = ~stk | ~wr[x, :nr, :ncol]
                wr[x, :nr, :ncol] = True
            else:
                allowed = ~stk
            new = torch.where(allowed, tile, old)
            changed = new != old
            stats[0] += changed.sum()
            stats[1] += (new > old).sum()
            stats[2] += (new < old).sum()
            stats[3] += (new - old).abs().sum()
            stats[4] += changed.any(dim=1).sum()
            for sl in range(slices):
                stats[len(STAT_NAMES) + sl] += changed[:, col_slice[:ncol] == sl].sum()
            if count_cells:
                cell_writes[x, :nr, :ncol] += changed.to(cell_writes.dtype)
            lv[x, :nr, :ncol] = new
            eff[o0:o1, k0:k1, :] = new.reshape(nr, o1 - o0, c).permute(1, 0, 2).to(torch.uint8)
    state.copy_(pack_levels(lv, state.shape[2]))
    written.copy_(pack_bits(wr))
    return eff, stats
