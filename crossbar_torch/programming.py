"""Model-wide programming: tiling, schedule, the shared crossbar pool, bit stucking and write
counting (DESIGN.md rules 5 to 8). One object, the :class:`CrossbarPool`, owns the physical
crossbars: their packed cell levels, the stuck masks and the per-cell write counters; the
transition counting itself runs in the ``program_layer`` op (C++ / CUDA, packed bits).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from . import ops
from .config import CrossbarConfig
from .modules import crossbar_layers
from .ops.reference import STAT_NAMES, column_slices, pack_bits, words_for


def layer_tiles(out: int, k: int, config: CrossbarConfig) -> int:
    """Rule 5: ceil(K / rows) sections times ceil(out / F) column blocks."""
    if out == 0 or k == 0:
        return 0
    return math.ceil(k / config.rows) * math.ceil(out / config.filters_per_crossbar)


def stuck_mask(config: CrossbarConfig, crossbar: int) -> torch.Tensor:
    """Rule 7: the fixed random stuck mask (rows, cols) bool of physical crossbar ``crossbar``.

    A pure function of (seed, crossbar, rows, cols) and the slice layout: uniform draws
    ``u = numpy.random.default_rng([seed, crossbar]).random((rows, cols))`` (float64); a cell
    is stuck when its column holds slice < stuck_slices (either array of a differential pair)
    and ``u >= reprogram_fraction`` (probability 1 - p). Columns no filter uses are never stuck.
    """
    if not config.stucking:
        return torch.zeros(config.rows, config.cols, dtype=torch.bool)
    u = np.random.default_rng([config.seed, crossbar]).random((config.rows, config.cols))
    col_slice = column_slices(config.cols, config.cells_per_weight, config.slices)
    low = (col_slice >= 0) & (col_slice < config.stuck_slices)
    return torch.from_numpy(u >= config.reprogram_fraction) & low[None, :]


class CrossbarPool:
    """The physical crossbars a model's tiles are streamed through (rule 6)."""

    def __init__(self, config: CrossbarConfig, device="cpu"):
        self.config = config
        pool, rows, cols, b = config.pool, config.rows, config.cols, config.bits_per_cell
        words = words_for(cols)
        stuck = torch.stack([stuck_mask(config, x) for x in range(pool)])  # (pool, rows, cols)
        self.stuck_bits = stuck  # unpacked, for mapping stuck cells back to layers
        self.stuck = pack_bits(stuck).to(device)
        self.state = torch.zeros(pool, rows, b, words, dtype=torch.int64, device=device)
        if config.stuck_value == 1:  # stuck-at level 1 from the start, never written
            self.state[:, :, 0, :] = self.stuck
        self.written = torch.zeros(pool, rows, words, dtype=torch.int64, device=device)
        self.cell_writes = torch.zeros(pool, rows, cols, dtype=torch.int32, device=device)
        self.next_tile = 0

    def program(self, cells: torch.Tensor, count_cells: bool):
        """Program one layer's tiles (target levels (out, K, c)), continuing the schedule."""
        cfg = self.config
        eff, stats = ops.program_layer(
            cells.to(self.state.device), self.state, self.written, self.stuck,
            self.cell_writes, self.next_tile, cfg.rows, cfg.cols, cfg.bits_per_cell,
            cfg.slices, cfg.stuck_value == "initial", count_cells)
        t0 = self.next_tile
        self.next_tile += layer_tiles(cells.shape[0], cells.shape[1], cfg)
        return eff, stats.cpu(), t0

    def layer_stuck(self, out: int, k: int, t0: int, chunk: int = 256) -> torch.Tensor:
        """Which cells of a layer (sorted order, (out, K, c)) sit on stuck physical cells."""
        cfg = self.config
        c, F, rows, cols, pool = (cfg.cells_per_weight, cfg.filters_per_crossbar, cfg.rows,
                                  cfg.cols, cfg.pool)
        blocks = math.ceil(out / F)
        flat = self.stuck_bits.reshape(-1)
        kk = torch.arange(k)
        sec, row = kk // rows, kk % rows
        result = torch.empty(out, k, c, dtype=torch.bool)
        for o0 in range(0, out, chunk):
            o = torch.arange(o0, min(out, o0 + chunk))
            x = (t0 + sec[None, :] * blocks + (o // F)[:, None]) % pool          # (o, K)
            col = (o % F)[:, None] * c + torch.arange(c)[None, :]               # (o, c)
            lin = ((x * rows + row[None, :]) * cols)[:, :, None] + col[:, None, :]
            result[o0:o0 + len(o)] = flat[lin]
        return result


@dataclass
class PassCounts:
    writes: int = 0
    sets: int = 0
    resets: int = 0
    pulses: int = 0
    rows_programmed: int = 0
    per_slice: list = field(default_factory=list)

    def add(self, stats: torch.Tensor) -> None:
        v = [int(x) for x in stats.tolist()]
        self.writes += v[0]
        self.sets += v[1]
        self.resets += v[2]
        self.pulses += v[3]
        self.rows_programmed += v[4]
        sl = v[len(STAT_NAMES):]
        if not self.per_slice:
            self.per_slice = [0] * len(sl)
        self.per_slice = [a + b for a, b in zip(self.per_slice, sl)]


@dataclass
class ProgramResult:
    """Counts of one programming of a model (two passes, rule 8)."""
    config: CrossbarConfig
    tiles: int = 0
    initial: PassCounts = field(default_factory=PassCounts)
    per_pass: PassCounts = field(default_factory=PassCounts)
    layers: list = field(default_factory=list)  # {name, tiles, shape, initial_writes, writes_per_pass}
    max_cell_writes_per_pass: int = 0


def _check_config(layers, config):
    """The layers' one config. Their scales, sort index and cell layout were made with it, so
    programming with another would count one thing and label it another: refuse that."""
    configs = {m.config for _, m in layers}
    if len(configs) > 1:
        raise ValueError("the crossbar layers of this model use different configs; convert "
                         "the whole model with one CrossbarConfig")
    mine = configs.pop()
    if config is not None and config != mine:
        diff = {k: (v, getattr(mine, k)) for k, v in config.to_dict().items()
                if v != getattr(mine, k)}
        raise ValueError(f"config differs from the one the layers were converted with "
                         f"(field: (given, layers)) {diff}; convert the model with it instead")
    return mine


TARGET_CACHE_BYTES = 1 << 28  # 256 MiB of cached target cells


def identity_index(out: int, k: int, device=None) -> torch.Tensor:
    return torch.arange(k, dtype=torch.int64, device=device).expand(out, k).contiguous()


def layer_targets(layer, config: CrossbarConfig, baseline: bool) -> torch.Tensor:
    """Target levels of a layer in programming order.

    * ``baseline``: unsorted (identity index), as rule 10's baseline programs them.
    * otherwise: sorted through the layer's fixed index; cells already known to be stuck keep
      the level they hold (after fine-tuning, a stuck cell does not take a new weight).
    """
    if baseline:
        w = layer.matrix_weight().detach().to(torch.float32).contiguous()
        idx = identity_index(w.shape[0], w.shape[1], w.device)
        return ops.sort_and_encode(w, layer.scale, idx, config.weight_bits,
                                   config.bits_per_cell, config.encoding_id)
    target = layer.target_cells()
    if layer.stuck.numel():
        target = torch.where(layer.stuck, layer.cells, target)
    return target


def program_model(model: nn.Module, config: CrossbarConfig | None = None, *,
                  baseline: bool = False, write_back: bool = False,
                  progress: bool = False) -> ProgramResult:
    """Program every crossbar layer of ``model``, two passes from pristine crossbars (rule 8).

    ``baseline`` programs the rule-10 baseline (no sort, no stucking) of the configuration.
    ``write_back`` stores what the crossbars hold after programming into the layers (their
    ``cells`` and ``stuck`` buffers), so inference computes with it (rule 9).
    """
    layers = crossbar_layers(model)
    if not layers:
        raise ValueError("the model has no crossbar layers: convert it first "
                         "(crossbar_torch.convert)")
    config = _check_config(layers, config)
    run_cfg = config.baseline() if baseline else config
    if baseline and write_back:
        raise ValueError("the baseline is a counting reference; it is never written back")
    device = layers[0][1].cells.device
    pool = CrossbarPool(run_cfg, device=device)
    result = ProgramResult(config=run_cfg)
    from tqdm.auto import tqdm
    total = 2 * len(layers)
    bar = tqdm(total=total, desc="program" + (" baseline" if baseline else ""),
               disable=not progress, leave=False)
    # Targets are the same in both passes: keep them from pass 1 while they fit the budget,
    # recompute the rest (memory stays bounded on ViT-sized models).
    cached, budget = {}, TARGET_CACHE_BYTES
    for pass_no in (0, 1):
        pool.next_tile = 0
        counts = result.initial if pass_no == 0 else result.per_pass
        for i, (name, layer) in enumerate(layers):
            target = cached.pop(i, None)
            if target is None:
                target = layer_targets(layer, config, baseline)
                if pass_no == 0 and target.numel() <= budget:
                    cached[i] = target
                    budget -= target.numel()
            eff, stats, t0 = pool.program(target, count_cells=pass_no == 1)
            counts.add(stats)
            out, k = target.shape[0], target.shape[1]
            if pass_no == 0:
                result.layers.append({"name": name, "kind": type(layer).__name__,
                                      "shape": [out, k], "tiles": layer_tiles(out, k, run_cfg),
                                      "initial_writes": int(stats[0])})
            else:
                result.layers[i]["writes_per_pass"] = int(stats[0])
                if write_back:
                    stuck = pool.layer_stuck(out, k, t0) if run_cfg.stucking else None
                    layer.set_cells(eff, stuck)
            bar.update(1)
        if pass_no == 0:
            result.tiles = pool.next_tile
    bar.close()
    result.max_cell_writes_per_pass = int(pool.cell_writes.max()) if pool.cell_writes.numel() else 0
    return result


def reprogram(model: nn.Module, *, progress: bool = False) -> ProgramResult:
    """Program the model's current (e.g. fine-tuned) latent weights onto the crossbars with
    the fixed sort index, scales and stuck cells, and store what the crossbars then hold in the
    layers. Returns the counts (also kept as ``model.crossbar_program``)."""
    result = program_model(model, write_back=True, progress=progress)
    object.__setattr__(model, "crossbar_program", result)
    return result
