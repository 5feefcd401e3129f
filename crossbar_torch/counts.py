"""What one programming of a model counts (docs/semantics.md rules 8, 10 and 15): the writes,
SET / RESET transitions and pulses of a pass (:class:`PassCounts`), and a whole programming's
initial pass, wear-levelling period, per-layer entries and per-cell statistics
(:class:`ProgramResult`). ``programming.program_model`` fills them."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import CrossbarConfig
from .ops import STAT_NAMES
from .wear import CellStats


@dataclass
class PassCounts:
    writes: int = 0
    sets: int = 0
    resets: int = 0
    pulses: int = 0
    rows_programmed: int = 0
    set_pulses: int = 0
    per_slice: list = field(default_factory=list)

    @property
    def reset_pulses(self) -> int:
        return self.pulses - self.set_pulses

    def per_pass(self, passes: int) -> "PassCounts":
        """These totals over ``passes`` passes as averages per pass (exact quotients; the same
        integers when ``passes`` is 1)."""
        if passes == 1:
            return self
        return PassCounts(*(getattr(self, f) / passes for f in
                            ("writes", "sets", "resets", "pulses", "rows_programmed",
                             "set_pulses")), [v / passes for v in self.per_slice])

    def add(self, stats: torch.Tensor) -> None:
        v = [int(x) for x in stats.tolist()]
        self.writes += v[0]
        self.sets += v[1]
        self.resets += v[2]
        self.pulses += v[3]
        self.rows_programmed += v[4]
        self.set_pulses += v[5]
        sl = v[len(STAT_NAMES):]
        if not self.per_slice:
            self.per_slice = [0] * len(sl)
        self.per_slice = [a + b for a, b in zip(self.per_slice, sl)]


@dataclass
class ProgramResult:
    """Counts of one programming of a model: the initial programming, then the steady passes of
    one wear-levelling period (rules 8 and 14; one pass without wear levelling)."""
    config: CrossbarConfig
    tiles: int = 0
    initial: PassCounts = field(default_factory=PassCounts)
    period: int = 1
    period_total: PassCounts = field(default_factory=PassCounts)
    # {name, kind, shape, tiles, initial_writes, writes_per_pass, tile_order, cell_stats}
    layers: list = field(default_factory=list)
    cells: CellStats = field(default_factory=CellStats)  # rule 15, over the whole pool
    crossbar_max: list = field(default_factory=list)  # max writes per pass of each crossbar

    @property
    def per_pass(self) -> PassCounts:
        """Steady-state counts per pass: the period's totals over its passes."""
        return self.period_total.per_pass(self.period)

    @property
    def max_cell_writes_per_pass(self):
        return int(self.cells.max) if self.period == 1 else self.cells.max
