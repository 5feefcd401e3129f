"""Where a layer's weights sit on the crossbars (docs/semantics.md rules 5, 6, 11 and 12).

One home for the geometry that programming, the layers and the reports share:

* the cell layout: which slice each physical column holds, the packed bit layout of a
  crossbar's state (``pack_bits``);
* the tile geometry of a layer (:class:`LayerGeometry`): sections, column blocks, tiles;
* the filter placement (rule 11): ``filter_index``, the filter in block j, slot f at
  ``j*F + f``, ``-1`` for an unused slot (a partial block leaves slots past its end unused);
* the tile order (rules 6 and 12): tile id ``s * n_blocks + j`` (section-major), the order a
  layer's tiles are programmed in, and where each weight's cells land (``weight_crossbars``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import ops
from .config import CrossbarConfig

UNUSED_SLOT = -1


# ---- cell layout -----------------------------------------------------------------------------

def column_slices(cols: int, cells_per_weight: int, slices: int) -> torch.Tensor:
    """Slice held by each physical column (-1 for columns no filter uses)."""
    F = cols // cells_per_weight
    col = torch.arange(cols)
    return torch.where(col < F * cells_per_weight, (col % cells_per_weight) % slices,
                       torch.full_like(col, -1))


def words_for(cols: int) -> int:
    """64-bit words per packed crossbar row."""
    return (cols + 63) // 64


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool (..., cols) -> int64 (..., words): bit j of word w is column 64*w + j."""
    cols = bits.shape[-1]
    words = words_for(cols)
    padded = torch.zeros(*bits.shape[:-1], words * 64, dtype=torch.int64)
    padded[..., :cols] = bits.to(torch.int64)
    padded = padded.reshape(*bits.shape[:-1], words, 64)
    shifts = torch.arange(64, dtype=torch.int64)
    return (padded << shifts).sum(-1)  # wraps into the sign bit for bit 63, as intended


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """int64 (..., words) -> bool (..., cols), the inverse of :func:`pack_bits`."""
    bits = torch.arange(64, dtype=torch.int64, device=packed.device)
    out = ((packed.unsqueeze(-1) >> bits) & 1).bool()
    return out.reshape(*packed.shape[:-1], -1)[..., :cols]


# ---- tile geometry -----------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerGeometry:
    """Rule 5: a layer of ``out`` filters of ``k`` weights on ``rows`` x ``cols`` crossbars."""
    out: int
    k: int
    rows: int
    c: int          # cells per weight
    F: int          # filters (slots) per crossbar

    @classmethod
    def of(cls, out: int, k: int, config: CrossbarConfig) -> "LayerGeometry":
        return cls(out, k, config.rows, config.cells_per_weight, config.filters_per_crossbar)

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.out / self.F) if self.out and self.k else 0

    @property
    def n_sections(self) -> int:
        return math.ceil(self.k / self.rows) if self.out and self.k else 0

    @property
    def tiles(self) -> int:
        return self.n_blocks * self.n_sections

    @property
    def slots(self) -> int:
        """Length of ``filter_index``: every slot of every column block."""
        return math.ceil(self.out / self.F) * self.F if self.out else 0


def layer_tiles(out: int, k: int, config: CrossbarConfig) -> int:
    """Rule 5: ceil(K / rows) sections times ceil(out / F) column blocks."""
    return LayerGeometry.of(out, k, config).tiles


# ---- filter placement (rule 11) ------------------------------------------------------------

def filter_index(q: torch.Tensor, config: CrossbarConfig,
                 sorted_by: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's placement, int64 (n_blocks * F,), from its quantized weights q (out, K).

    ``natural``: filter o in block o // F, slot o % F. ``profile``: rank the filters by
    sum_k |q[o, k]| descending (stable), ``order``; block j holds order[j], order[j + nb],
    order[j + 2nb], ... in slots 0, 1, 2, ...; the slots past a block's end are unused (-1).
    ``chain`` (this project's, beyond rule 11): the ranking is a nearest-neighbour chain
    instead (:func:`chain_order`), placed the same way. ``sorted_by``: the layer's rule-4 sort
    index of q, when the caller has it (the chain reads the sorted rows; else it sorts).
    """
    out = q.shape[0]
    geom = LayerGeometry.of(out, q.shape[1] if q.dim() == 2 else 0, config)
    F, nb = geom.F, math.ceil(out / geom.F) if out else 0
    index = torch.full((nb * F,), UNUSED_SLOT, dtype=torch.int64)
    if config.filter_order == "natural" or out == 0:
        index[:out] = torch.arange(out)
        return index
    if config.filter_order == "chain":
        order = chain_order(q, config, sorted_by)
    else:
        profile = q.to(torch.int64).abs().sum(dim=1)
        order = torch.sort(profile, descending=True, stable=True).indices
    rank = torch.arange(out)
    block, slot = rank % nb, rank // nb          # rank r -> block r mod nb, slot r div nb
    index[block * F + slot] = order
    return index


def chain_order(q: torch.Tensor, config: CrossbarConfig,
                index: torch.Tensor | None = None) -> torch.Tensor:
    """A ranking of the filters in which neighbours hold similar cells.

    Each filter is described by the bits of its cells after sorting (its sorted row, encoded,
    as the crossbar will hold it). Start from the filter of largest sum |q| (the first of
    profile); then repeatedly append the unvisited filter at the smallest Hamming distance from
    the last one (ties: the lowest filter number). The profile placement puts rank neighbours
    in one slot of consecutive column blocks, so consecutive tiles then differ in few cells.
    The chain runs in the ``chain_order`` op (XOR + popcount over the packed bits, row by row;
    ``ops.reference.chain_order`` is the same ranking from a distance matrix).
    """
    from .quantization import sort_rows

    out, k = q.shape
    if k == 0:
        return torch.arange(out)
    if index is None:
        index = sort_rows(q, config.sort)
    q_sorted = torch.gather(q, 1, index.long()).to(torch.int32).contiguous()
    cells = ops.encode(q_sorted, config.weight_bits, config.bits_per_cell, config.encoding_id)
    start = int(torch.argmax(q.to(torch.int64).abs().sum(1)))  # first maximum: lowest filter
    return ops.chain_order(filter_bits(cells, config.bits_per_cell), start)


def filter_bits(cells: torch.Tensor, bits_per_cell: int) -> torch.Tensor:
    """int64 (out, W): the bits of each filter's cells (uint8 (out, K, c)), every bit plane of
    every cell, packed 64 to a word (zero padded): Hamming distances between rows are those
    between the filters' cells."""
    out = cells.shape[0]
    planes = (cells if bits_per_cell == 1  # one plane: the levels are the bits
              else torch.stack([(cells >> p) & 1 for p in range(bits_per_cell)], -1))
    packed = np.packbits(planes.reshape(out, -1).cpu().numpy(), axis=1, bitorder="little")
    words = -(-packed.shape[1] // 8)
    padded = np.zeros((out, words * 8), dtype=np.uint8)
    padded[:, :packed.shape[1]] = packed
    return torch.from_numpy(padded.view(np.int64).copy())


def natural_filter_index(out: int, config: CrossbarConfig) -> torch.Tensor:
    # placement is not a per-layer field (rule 22): the overrides need no checking again
    return filter_index(torch.zeros(out, 0, dtype=torch.int32), config.replace(
        filter_order="natural", layer_overrides=()))


def check_filter_index(index: torch.Tensor, out: int, config: CrossbarConfig) -> str | None:
    """Why ``index`` is not a placement of ``out`` filters (None when it is)."""
    slots = LayerGeometry.of(out, 1, config).slots
    if index.dtype != torch.int64 or index.dim() != 1 or index.numel() != slots:
        return f"must be int64 of shape ({slots},), got {index.dtype} {tuple(index.shape)}"
    used = index[index != UNUSED_SLOT]
    if not torch.equal(used.sort().values.cpu(), torch.arange(out)):
        return f"must place each of the {out} filters exactly once (-1 marks an unused slot)"
    return None


# ---- tile order (rules 6 and 12) -----------------------------------------------------------

def section_major_order(tiles: int) -> torch.Tensor:
    return torch.arange(tiles, dtype=torch.int64)


def weight_crossbars(geom: LayerGeometry, index: torch.Tensor, order: torch.Tensor, t0: int,
                     pool: int, crossbars: bool = True):
    """Where each weight of a layer is programmed: ``(crossbar (out, K), row (K,), col0 (out,))``.

    Weight (o, k') of the sorted layer sits in row k' mod rows of the physical crossbar that
    programs its tile (the tile at position ``p`` of ``order`` is global tile ``t0 + p``, on
    crossbar ``(t0 + p) mod pool``), in columns ``col0[o] .. col0[o] + c - 1``.
    ``crossbars=False`` leaves out the (out, K) crossbar map (None): rows and columns only.
    """
    out, k, nb, F = geom.out, geom.k, geom.n_blocks, geom.F
    slot_of = torch.empty(out, dtype=torch.int64)
    used = (index != UNUSED_SLOT).nonzero().flatten()
    slot_of[index[used]] = used                              # filter -> j*F + f
    block, col0 = slot_of // F, (slot_of % F) * geom.c
    kk = torch.arange(k)
    if not crossbars:
        return None, kk % geom.rows, col0
    position = torch.empty(geom.tiles, dtype=torch.int64)    # tile id -> place in the order
    position[order] = torch.arange(geom.tiles)
    tile = (kk // geom.rows)[None, :] * nb + block[:, None]  # (out, K) tile ids
    crossbar = (t0 + position[tile]) % pool
    return crossbar, kk % geom.rows, col0


def format_order(order, width: int | None = None) -> str:
    """A tile order as text, runs of consecutive ids as ``a-b`` (section-major: ``0-N``);
    cut at ``width`` characters with the number of tiles left out."""
    parts, i, order = [], 0, list(order)
    while i < len(order):
        j = i
        while j + 1 < len(order) and order[j + 1] == order[j] + 1:
            j += 1
        parts.append(str(order[i]) if i == j else f"{order[i]}-{order[j]}")
        i = j + 1
    text = " ".join(parts)
    if width is not None and len(text) > width:
        cut = text[:width].rsplit(" ", 1)[0]
        shown = sum(int(p.split("-")[1]) - int(p.split("-")[0]) + 1 if "-" in p else 1
                    for p in cut.split())
        text = f"{cut} ... (+{len(order) - shown} tiles)"
    return text or "-"
