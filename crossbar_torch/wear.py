"""Wear of the physical cells: the per-cell write statistics and lifetime of docs/semantics.md
rules 14 and 15.

Programming (``programming.py``) counts every write of every physical cell over the steady
passes of one wear-levelling period; this module turns those counters into what a hardware team
reads: how evenly the writes fall (p50, p99, max, a histogram) and how many passes the hottest
cell, and the hottest 1% of cells, survive on a device of a given endurance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from .device import passes_until

HISTOGRAM_BINS = 40


def shift_frame(t: torch.Tensor, rows: int, cols: int, dr: int, dc: int) -> torch.Tensor:
    """Rule 14: re-index (..., rows, cols) per-cell data from one mapping frame to the next.

    Logical cell (i, j) of a frame with offset (a, b) is physical cell ((i + a) mod rows,
    (j + b) mod cols). Moving from offset (a, b) to (a + dr, b + dc): the new frame's cell
    (i, j) is the old frame's (i + dr, j + dc), i.e. a roll by (-dr, -dc)."""
    if dr % rows == 0 and dc % cols == 0:
        return t
    return torch.roll(t, shifts=(-dr, -dc), dims=(-2, -1))


def kth_largest(values: torch.Tensor, k: int) -> int:
    """The k-th largest of integer ``values`` (k >= 1), exactly (no interpolation)."""
    return int(torch.topk(values, k).values[-1]) if k <= 256 else int(
        torch.sort(values, descending=True).values[k - 1])


@dataclass
class CellStats:
    """Writes per pass of the worn cells (cells with at least one write in the period).

    Every value is a period total divided by the period, so a per-pass average (rule 15).
    ``p99`` is the value the hottest 1% of the worn cells reach or exceed (the
    ceil(n/100)-th largest), ``p50`` the ceil(n/2)-th largest."""
    cells: int = 0            # physical cells counted (pool * rows * cols)
    worn_cells: int = 0
    mean: float = 0.0
    p50: float = 0.0
    p99: float = 0.0
    max: float = 0.0
    histogram: dict = field(default_factory=lambda: {"bin_edges": [], "counts": []})
    # the exact period totals behind max and p99 (lifetimes are computed on rationals)
    period: int = 1
    max_total: int = 0
    p99_total: int = 0

    def to_dict(self) -> dict:
        return {"cells": self.cells, "worn_cells": self.worn_cells, "mean": self.mean,
                "p50": self.p50, "p99": self.p99, "max": self.max, "histogram": self.histogram}

    def lifetime(self, endurance: float) -> dict:
        """Rule 15: passes until the hottest cell, and until 1% of the worn cells, have taken
        ``endurance`` writes (None: never, no cell wears)."""
        return {"passes_to_first_failure": self.passes(endurance, self.max_total),
                "passes_to_1pct_failure": self.passes(endurance, self.p99_total)}

    def passes(self, endurance: float, total: int) -> int | None:
        return passes_until(endurance, Fraction(total, self.period))


def cell_stats(totals: torch.Tensor, period: int, bins: int = HISTOGRAM_BINS,
               brief: bool = False) -> CellStats:
    """Statistics of per-cell write totals over ``period`` passes (any shape, integer).
    ``brief``: worn cells, mean, max and p99 only (p50 and the histogram left empty), for the
    per-layer statistics a report computes for every layer."""
    flat = totals.reshape(-1).to(torch.int64).cpu()
    worn = flat[flat > 0]
    n = int(worn.numel())
    st = CellStats(cells=int(flat.numel()), worn_cells=n, period=period)
    if n == 0:
        return st
    per = worn.to(torch.float64) / period
    st.mean = float(worn.sum()) / period / n
    st.max_total = int(worn.max())
    st.p99_total = kth_largest(worn, math.ceil(n / 100))
    st.max = st.max_total / period
    st.p99 = st.p99_total / period
    if brief:
        return st
    st.p50 = kth_largest(worn, math.ceil(n / 2)) / period
    # equal-width bins from 0 to the maximum; the last bin holds the maximum
    top = st.max
    edges = torch.linspace(0.0, top, bins + 1, dtype=torch.float64)
    counts = torch.histc(per, bins=bins, min=0.0, max=top) if top > 0 else torch.tensor([n])
    st.histogram = {"bin_edges": [float(e) for e in edges],
                    "counts": [int(c) for c in counts.round().to(torch.int64)]}
    return st
