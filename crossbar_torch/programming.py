"""Model-wide programming: the shared crossbar pool, bit stucking, compensation and write
counting (docs/semantics.md rules 6 to 13). One object, the :class:`CrossbarPool`, owns the
physical crossbars: their packed cell levels, the stuck masks and the per-cell write counters;
the programming itself (tile order, transitions, compensation) runs in the ``program_layer``
op (C++ / CUDA, packed bits). Where weights sit is the mapping module's (``mapping.py``).

Data flows one way: layer (targets, placement, stored tile order) -> mapping (geometry) ->
programming (pool) -> layer (held cells, stuck cells, tile order).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from . import ops
from .config import COUNTING_FIELDS, CrossbarConfig
from .errors import ConfigError, ModelStateError
from .mapping import (LayerGeometry, column_slices, layer_tiles,  # noqa: F401
                      natural_filter_index, pack_bits, unpack_bits, weight_crossbars, words_for)
from .heap import release_free_memory
from .packing import pack_mask
from .stuck_flags import remember_stuck_flags, stuck_flags
from .feedback import (FactorCache, feedback_cells, feedback_choice, sorted_integers,
                       warn_output_errors)
from .nn.modules import crossbar_layers
from .nn.modules.state import feedback_active, policy_name
from .nn.record import no_crossbar_layers
from .quantization import check_weight
from .noise import program_noise
from .counts import PassCounts, ProgramResult  # noqa: F401 (re-exported)
from .wear import cell_stats, shift_frame

NOT_PINNED = 255  # program_layer's `pinned` level for a cell whose held level is not known


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
        # rule 22: the masks of layers whose overrides stuck other cells, by (L, p)
        self._masks = {self._mask_key(config): (self.stuck_bits, self.stuck)}
        self.state = torch.zeros(pool, rows, b, words, dtype=torch.int64, device=device)
        if config.stuck_value == 1:  # stuck-at level 1 from the start, never written
            self.state[:, :, 0, :] = self.stuck
        self.written = torch.zeros(pool, rows, words, dtype=torch.int64, device=device)
        self.cell_writes = torch.zeros(pool, rows, cols, dtype=torch.int32, device=device)
        self.next_tile = 0
        self.offset = (0, 0)  # rule 14: the mapping offset the tensors above are indexed in

    def move_to(self, offset: tuple) -> None:
        """Re-index the crossbars' per-cell tensors in the frame of mapping ``offset`` (rule 14):
        afterwards cell (i, j) of every tensor is physical cell ((i + a) mod rows,
        (j + b) mod cols), which is where the mapping puts a tile's cell (i, j). Counting stays
        on physical cells; only their indexing moves."""
        rows, cols = self.config.rows, self.config.cols
        dr, dc = offset[0] - self.offset[0], offset[1] - self.offset[1]
        self.offset = tuple(offset)
        if dr % rows == 0 and dc % cols == 0:
            return

        def packed(t):  # (..., rows, words) packed bits
            return pack_bits(shift_frame(unpack_bits(t.cpu(), cols), rows, cols, dr, dc)).to(
                t.device)

        self.state = packed(self.state.transpose(1, 2)).transpose(1, 2).contiguous()
        self.written = packed(self.written)
        self.stuck = packed(self.stuck)
        self.stuck_bits = shift_frame(self.stuck_bits, rows, cols, dr, dc)
        self.cell_writes = shift_frame(self.cell_writes, rows, cols, dr, dc).contiguous()

    @staticmethod
    def _mask_key(cfg: CrossbarConfig):
        return (cfg.stuck_slices, cfg.reprogram_fraction) if cfg.stucking else None

    def masks(self, cfg: CrossbarConfig):
        """(unpacked, packed) stuck masks of the pool for a layer programmed with ``cfg`` (its
        rule-22 config): the same draws (rule 7), with that layer's L and p."""
        key = self._mask_key(cfg)
        got = self._masks.get(key)
        if got is None:
            if self.offset != (0, 0):
                raise RuntimeError("per-layer stucking with a shifted mapping (rule 14)")
            bits = torch.stack([stuck_mask(cfg, x) for x in range(self.config.pool)])
            got = self._masks[key] = (bits, pack_bits(bits).to(self.state.device))
        return got

    def program(self, cells: torch.Tensor, filter_index: torch.Tensor, order: torch.Tensor | None,
                pinned: torch.Tensor | None, count_cells: bool,
                layer_config: CrossbarConfig | None = None):
        """Program one layer's tiles (target levels (out, K, c)), continuing the schedule.

        ``order`` replays a tile order; None chooses it (section-major, or greedy per the
        config). ``pinned``: levels already known for cells on stuck positions (255 elsewhere).
        Returns (effective cells, stats, the order used, the layer's first global tile)."""
        cfg = self.config if layer_config is None else layer_config
        dev = self.state.device
        stuck = self.masks(cfg)[1]
        empty = torch.empty(0, dtype=torch.int64, device=dev)
        window = cfg.schedule_window if cfg.schedule == "greedy" else 0
        eff, stats, used = ops.program_layer(
            cells.to(dev), filter_index.to(dev), empty if order is None else order.to(dev),
            torch.empty(0, dtype=torch.uint8, device=dev) if pinned is None else pinned.to(dev),
            self.state, self.written, stuck, self.cell_writes, self.next_tile, cfg.rows,
            cfg.cols, cfg.weight_bits, cfg.bits_per_cell, cfg.encoding_id,
            cfg.stuck_value == "initial", count_cells,
            cfg.stuck_slices if cfg.compensate and cfg.stucking else 0, window)
        t0 = self.next_tile
        self.next_tile += layer_tiles(cells.shape[0], cells.shape[1], cfg)
        return eff, stats.cpu(), used.cpu(), t0

    def all_written(self, geom: LayerGeometry) -> bool:
        """Whether every cell a layer's tiles can cover (the first ``min(k, rows)`` rows and
        ``F * c`` columns of every crossbar) has been written: a stuck cell takes a level only
        on its first write (``stuck_value='initial'``), so from then on the levels known for
        stuck cells change nothing and need not be built. Answered on the host only (False
        on a GPU, where asking would wait for the device)."""
        if self.written.device.type != "cpu":
            return False
        bits = unpack_bits(self.written[:, :min(geom.k, geom.rows)], self.config.cols)
        return bool(bits[..., :geom.F * geom.c].all())

    def layer_stuck(self, geom: LayerGeometry, filter_index: torch.Tensor, order: torch.Tensor,
                    t0: int, layer_config: CrossbarConfig | None = None) -> torch.Tensor:
        """Which cells of a layer (sorted order) sit on stuck physical cells (of the layer's
        own mask, rule 22), packed as a layer stores them (``packing.pack_mask``: uint8
        (out, K, ceil(c / 8))). Packed per (row, slot) of the crossbar first and gathered
        after: an eighth of the bytes of gathering the (out, K, c) flags."""
        stuck_bits = self.masks(self.config if layer_config is None else layer_config)[0]
        pool = self.config.pool
        # one crossbar: every weight is on crossbar 0, no (out, K) map of crossbars needed
        crossbar, row, col0 = weight_crossbars(geom, filter_index.cpu(), order, t0, pool,
                                               crossbars=pool > 1)
        slot = col0 // geom.c
        span = geom.F * geom.c
        result = None
        for x in (range(pool) if pool <= 8 else crossbar.unique().tolist()):
            # crossbar x's mask at each weight's row and slot, as if every tile went there
            packed = pack_mask(stuck_bits[x, :, :span].reshape(-1, geom.F, geom.c))
            on_x = packed.index_select(0, row).index_select(1, slot).permute(1, 0, 2)
            result = (on_x.contiguous() if result is None
                      else torch.where((crossbar == x)[:, :, None], on_x, result))
        if result is None:
            return pack_mask(torch.zeros(geom.out, geom.k, geom.c, dtype=torch.bool))
        return result


def _check_config(layers, config):
    """The layers' one config. Their scales, sort index and cell layout were made with it, so
    programming with another would count one thing and label it another: refuse that."""
    configs = {m.config for _, m in layers}
    if len(configs) > 1:
        raise ConfigError("the crossbar layers of this model use different configs; convert "
                         "the whole model with one CrossbarConfig")
    mine = configs.pop()
    if config is None:
        return mine
    diff = config.diff(mine, ignore=COUNTING_FIELDS)
    if diff:
        raise ConfigError(f"config differs from the one the layers were converted with "
                         f"(field: (given, layers)) {diff}; convert the model with it instead")
    return config  # the counting fields (wear levelling, device) are the caller's to choose


TARGET_CACHE_BYTES = 1 << 28  # 256 MiB of cached target cells
LAYER_CELL_BYTES = 1 << 29  # 512 MiB of per-layer per-cell counters across a wear period


def identity_index(out: int, k: int, device=None) -> torch.Tensor:
    return torch.arange(k, dtype=torch.int64, device=device).expand(out, k).contiguous()


def layer_targets(layer, config: CrossbarConfig, baseline: bool,
                  feedback: torch.Tensor | None = None, check_values: bool = True,
                  pool: CrossbarPool | None = None):
    """Target levels of a layer in programming order, and the levels already known for its
    cells on stuck positions (or None; None too when ``pool``, the crossbars it goes onto, has
    written every cell it can cover: no stuck cell takes a level now, ``all_written``).

    * ``baseline``: unsorted (identity index), as rule 10's baseline programs them.
    * otherwise: sorted through the layer's fixed index; a cell already known to be stuck
      keeps the level it holds (after fine-tuning, a stuck cell does not take a new weight).
    * ``feedback``: rule 21's integers (``feedback.sorted_integers``) replace the latent weight's.
    * ``check_values``: check the weight, scales and sort index (the first pass does; later
      passes of the same programming read the same, unchanged tensors).
    """
    if baseline:
        w = layer.matrix_weight().detach().to(torch.float32).contiguous()
        idx = identity_index(w.shape[0], w.shape[1], w.device)
        return ops.sort_and_encode(w, layer.scale, idx, config.weight_bits,
                                   config.bits_per_cell, config.encoding_id,
                                   check_values=check_values), None
    if feedback is not None:  # rule 21: the integers error feedback chose
        target = feedback_cells(layer, config, feedback)
    else:
        target = layer.target_cells(check_values=check_values)
    if not layer.stuck.numel() or (pool is not None and pool.all_written(
            LayerGeometry.of(target.shape[0], target.shape[1], config))):
        return target, None
    # transient copies (unpacked), changed in place: on the ViT-Base-sized model each is 1.2G
    # cells a pass, and each full-size temporary not written is a second of a reprogramming
    stuck, held = layer.stuck_cells().to(target.device), layer.held_cells().to(target.device)
    if not config.compensate:  # the kernel needs only the levels to write
        return torch.where(stuck, held, target, out=target), None
    # rule 13 searches around the plain targets: keep them, and say which levels are known
    return target, held.masked_fill_(stuck.logical_not_(), NOT_PINNED)


def program_model(model: nn.Module, config: CrossbarConfig | None = None, *,
                  baseline: bool = False, write_back: bool = False,
                  progress: bool = False, layer_wear: bool = True) -> ProgramResult:
    """Program every crossbar layer of ``model`` from pristine crossbars: the initial
    programming, then the steady passes of one wear-levelling period (rules 8 and 14; one pass
    without wear levelling), counting every physical cell's writes (rule 15).

    ``baseline`` programs the rule-10 baseline (no sort, no stucking) of the configuration.
    ``write_back`` stores what the crossbars hold after programming into the layers (their
    ``cells`` and ``stuck`` buffers), so inference computes with it (rule 9), and the tile
    order of every layer (``tile_order``), which later programmings replay (rule 12).
    A layer that already holds a tile order replays it (except for the baseline, which
    chooses its own in its first pass). ``layer_wear=False`` leaves out the per-layer cell
    statistics (their ``cell_stats`` is None); the pool's are always counted.
    """
    layers = crossbar_layers(model)
    if not layers:
        raise no_crossbar_layers(model, "program_model")
    config = _check_config(layers, config)
    run_cfg = config.baseline() if baseline else config
    if baseline and write_back:
        raise ModelStateError("the baseline is a counting reference; it is never written back")
    device = layers[0][1].cells.device
    pool = CrossbarPool(run_cfg, device=device)
    result = ProgramResult(config=run_cfg)
    from tqdm.auto import tqdm
    total = (1 + run_cfg.wear_period) * len(layers)
    bar = tqdm(total=total, desc="program" + (" baseline" if baseline else ""),
               disable=not progress, leave=False)
    # Targets are the same in every pass: keep them from the first while they fit the budget,
    # recompute the rest (memory stays bounded on ViT-sized models).
    cached, budget = {}, TARGET_CACHE_BYTES
    feedback = {}  # rule 21's integers per layer, int16 (out, K) in sorted order
    energies = {}  # the output error energy each will have, known from rule 21's residuals
    layer_cfgs = [run_cfg.for_layer(policy_name(layer, name)) for name, layer in layers]  # rule 22
    # rule 21: query, key and value share one factor; the next of a shape is computed beside
    factors = FactorCache([] if baseline else [
        (layer.input_moment, cfg.feedback_damp) for (_, layer), cfg in zip(layers, layer_cfgs)
        if feedback_active(layer, cfg)])
    orders = {}
    period = result.period = run_cfg.wear_period
    shape = tuple(pool.cell_writes.shape)
    cells_total = torch.zeros(shape, dtype=torch.int64)  # physical, over the period
    # per-layer per-cell totals, kept across a period (> 1 pass) while they fit the bound
    keep_layers = layer_wear and (
        period == 1 or len(layers) * pool.cell_writes.numel() * 8 <= LAYER_CELL_BYTES)
    layer_cells = {}
    # rule 19: the programming error / drift of every cell needs each layer's writes replayed
    noise = write_back and (run_cfg.prog_noise or run_cfg.drift_nu or run_cfg.drift_nu_std)
    placed = [] if noise else None
    for pass_no in range(1 + period):
        pool.next_tile = 0
        pool.move_to(run_cfg.pass_offset(pass_no))
        counting = pass_no >= 1
        counts = result.period_total if counting else result.initial
        for i, (name, layer) in enumerate(layers):
            lcfg = layer_cfgs[i]
            target, pinned = cached.get(i, (None, None))
            if pass_no == 0:  # name the layer (the kernel's message cannot)
                check_weight(layer.matrix_weight().detach(), f"{name}.weight")
            if target is None:
                if pass_no == 0 and not baseline and feedback_active(layer, lcfg):
                    # rule 21: chosen once per programming (from the held cells the last
                    # programming left), kept for the later passes
                    q, energies[i] = feedback_choice(layer, lcfg, factors)
                    feedback[i] = sorted_integers(layer, lcfg, q)
                target, pinned = layer_targets(layer, lcfg, baseline, feedback.get(i),
                                               check_values=pass_no == 0, pool=pool)
                if pass_no == 0 and target.numel() <= budget:
                    cached[i] = (target, pinned)
                    budget -= target.numel() * (2 if pinned is not None else 1)
            out, k = target.shape[0], target.shape[1]
            geom = LayerGeometry.of(out, k, run_cfg)
            order = orders.get(i)
            if order is None and not baseline and layer.tile_order.numel() == geom.tiles > 0:
                order = layer.tile_order.cpu()  # rule 12: the stored order is replayed
            # the baseline places filters naturally (rule 10); a layer's own placement is rule 11
            index = natural_filter_index(out, run_cfg) if baseline else layer.filter_index
            if counting and layer_wear:
                pool.cell_writes.zero_()  # this layer's writes alone
            eff, stats, used, t0 = pool.program(target, index, order, pinned,
                                                count_cells=counting, layer_config=lcfg)
            # this layer's transients, about 4 of its unpacked cells (crossbar_torch/heap.py)
            release_free_memory(4 * target.numel())
            del target, pinned
            orders[i] = used
            counts.add(stats)
            if noise and pass_no == 0:
                placed.append([geom, index.cpu(), used, t0, eff.cpu(), None])
            if pass_no == 0:
                result.layers.append({"name": name, "kind": type(layer).__name__,
                                      "shape": [out, k], "tiles": geom.tiles,
                                      "initial_writes": int(stats[0]), "period_writes": 0})
                bar.update(1)
                continue
            entry = result.layers[i]
            entry["period_writes"] += int(stats[0])
            if layer_wear:  # this layer's per-cell writes, indexed physically (rule 14)
                mine = shift_frame(pool.cell_writes.cpu(), run_cfg.rows, run_cfg.cols,
                                   -pool.offset[0], -pool.offset[1]).to(torch.int64)
                cells_total += mine
                if period == 1:  # the layer's statistics now: nothing to keep
                    entry["cell_stats"] = cell_stats(mine, 1, brief=True)
                elif keep_layers:
                    layer_cells[i] = mine if i not in layer_cells else layer_cells[i] + mine
            if pass_no == 1:
                entry["tile_order"] = used.tolist()
                if noise:
                    placed[i][5] = eff.cpu()
                if write_back:
                    stuck = stuck_flags(pool, layer, geom, used, t0, lcfg)
                    layer.set_cells(eff, stuck, used)
                    remember_stuck_flags(pool, layer, t0, lcfg)
                    if energies.get(i) is not None:  # the effective weights are rule 21's q'
                        layer.note_output_error(energies[i])
            bar.update(1)
        if pass_no == 0:
            result.tiles = pool.next_tile
        elif not layer_wear:  # the whole pass at once
            cells_total += shift_frame(pool.cell_writes.cpu(), run_cfg.rows, run_cfg.cols,
                                       -pool.offset[0], -pool.offset[1]).to(torch.int64)
            pool.cell_writes.zero_()
    bar.close()
    if noise:
        for (_, layer), (eps, nu) in zip(layers, program_noise(run_cfg, pool.stuck_bits, placed)):
            dev = layer.cells.device
            layer.prog_eps = eps.to(dev) if eps is not None else layer.prog_eps.new_zeros(0)
            layer.drift_nu = nu.to(dev) if nu is not None else layer.drift_nu.new_zeros(0)
    for i, entry in enumerate(result.layers):
        w = entry.pop("period_writes")
        entry["writes_per_pass"] = w if period == 1 else w / period
        if period > 1 or not layer_wear:
            entry["cell_stats"] = (cell_stats(layer_cells.pop(i), period, brief=True)
                                   if keep_layers else None)
    result.cells = cell_stats(cells_total, period)
    result.crossbar_max = [float(v) / period if period > 1 else int(v)
                           for v in cells_total.flatten(1).max(1).values.tolist()]
    return result


def reprogram(model: nn.Module, *, progress: bool = False) -> ProgramResult:
    """Program the model's current (e.g. fine-tuned) latent weights onto the crossbars with
    the fixed sort index, scales and stuck cells, and store what the crossbars then hold in the
    layers. Returns the counts (also kept as ``model.crossbar_program``)."""
    result = program_model(model, write_back=True, progress=progress)
    object.__setattr__(model, "crossbar_program", result)
    object.__setattr__(model, "_crossbar_program_stamp", _program_stamp(model))
    warn_output_errors(model)  # calibrated layers only (rule 21's moments)
    return result


def _program_stamp(model: nn.Module):
    """What the last programming's counts depend on, as cheap identities: each layer's name and
    the object and version counter of every buffer programming reads or writes. Any in-place
    change (load_state_dict, an optimizer step on a buffer) bumps a version; a new tensor has
    a new id. The latent weights are checked separately (``_weight_changed``)."""
    stamp = []
    for name, layer in crossbar_layers(model):
        for buf in ("cells", "stuck", "scale", "sort_index", "filter_index", "tile_order",
                    "input_moment", "output_gain"):  # rules 21 and 26 program with them
            t = getattr(layer, buf)
            if t.is_inference():
                return None
            stamp.append((name, buf, id(t), t._version))
    return tuple(stamp)


def last_program(model: nn.Module, config: CrossbarConfig | None) -> ProgramResult | None:
    """The counts of the model's last programming (``reprogram`` / ``convert``) when programming
    it again would give the same numbers: same layers, buffers and latent weights, same config.
    Programming is a pure function of those (rule 8 counts from pristine crossbars, and the
    stored tile order and stuck levels replay the first programming exactly)."""
    result = getattr(model, "crossbar_program", None)
    stamp = getattr(model, "_crossbar_program_stamp", None)
    if result is None or stamp is None or stamp != _program_stamp(model):
        return None
    if config is not None and config != result.config:
        return None
    if any(layer._weight_changed() for _, layer in crossbar_layers(model)):
        return None
    return result
