"""The analog periphery of a crossbar layer: DAC, ADC, conductance noise and drift
(docs/semantics.md rules 17 to 20).

A crossbar layer whose config is not ideal (``config.analog``) computes its output here instead
of with the cached GEMM of rule 9:

* ``conductances``: each cell's conductance in level units (rule 19), from the held levels,
  the programming error of its last write, its drift and a fresh read-noise draw;
* ``layer_output``: the layer's output: without an ADC one float64 op over the quantized
  inputs (the shift-and-add is then linear); with an ADC per bit-sliced column the fused op
  ``analog_matmul`` on the input rows (im2col for a convolution); with ``adc_scope="weight"``
  one GEMM or convolution per 128-row section (``_weight_scope``);
* ``calibrate``: the input and ADC ranges of every layer, from one batch (rule 20);
* ``program_noise``: after programming, the programming error and drift exponent of every cell
  (rule 19), replaying the writes tile by tile on the physical crossbars.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn as nn

from .. import ops
from ..config import CrossbarConfig
from ..mapping import weight_crossbars
from ..ops.analog_reference import adc_step

T0_SECONDS = 1.0


# ---- cell decoding weights (rule 18) -----------------------------------------------------------

def cell_weights(cfg: CrossbarConfig) -> tuple:
    """(w_i (c,) float64, encoding offset): q = sum_i w_i * level_i - offset (rule 3 / 18)."""
    S, b, B = cfg.slices, cfg.bits_per_cell, cfg.weight_bits
    w = [float(2 ** (b * i)) for i in range(S)]
    if cfg.encoding == "differential":
        return torch.tensor(w + [-v for v in w], dtype=torch.float64), 0.0
    if cfg.encoding == "offset":
        return torch.tensor(w, dtype=torch.float64), float(cfg.qmax)  # u = q + qmax
    # two's complement, top slice = the sign bit alone (checked by the config)
    w[-1] = -float(2 ** (B - 1))
    return torch.tensor(w, dtype=torch.float64), 0.0


def cell_slices(cfg: CrossbarConfig) -> list:
    """Slice of each of a weight's c cells."""
    return [i % cfg.slices for i in range(cfg.cells_per_weight)]


# ---- conductances (rule 19) ------------------------------------------------------------------

def _seed(*parts) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> 1)


def conductances(layer, read: bool = True, cells: torch.Tensor | None = None) -> torch.Tensor:
    """float32 (out, c, K): the conductance of every cell in level units, as the crossbar reads
    it now (rule 19). ``read`` draws a fresh read noise (one per forward). ``cells``: levels
    to read instead of the held ones (train mode: what programming the latent weight gives)."""
    cfg = layer.config
    g = (layer.cells if cells is None else cells).to(torch.float32) + cfg.g0
    if cfg.prog_noise and layer.prog_eps.numel():
        g = g * (1 + cfg.prog_noise * layer.prog_eps)
    if layer.drift_nu.numel() and cfg.t_inference > T0_SECONDS:
        g = g * torch.pow(torch.tensor(cfg.t_inference / T0_SECONDS), -layer.drift_nu)
    if read and cfg.read_noise:
        eps = _read_noise_draw(layer, tuple(g.shape)).to(g.device)
        g = g * (1 + cfg.read_noise * eps)
    return torch.clamp(g, min=0).permute(0, 2, 1).contiguous()


@torch.compiler.disable
def _read_noise_draw(layer, shape: tuple) -> torch.Tensor:
    """Rule 19: the layer's next read-noise draw (standard normal, float32, CPU), keyed by
    (seed, layer, forward count). Run eagerly under ``torch.compile``: the seed is numpy
    arithmetic (uint64), which a traced graph cannot hold, and the count is python state that
    must advance on every call."""
    count = layer._forward_count
    layer._forward_count += 1
    gen = torch.Generator().manual_seed(_seed(layer.config.seed, 3, layer.layer_number, count))
    return torch.randn(shape, generator=gen, dtype=torch.float32)


# ---- the layer's output (rules 17 and 18) --------------------------------------------------------

class CalibrationNeeded(RuntimeError):
    pass


def input_scale(layer, x: torch.Tensor) -> float:
    """Rule 17: s_x = r / (2**I - 1) (1.0 with an ideal DAC)."""
    cfg = layer.config
    if cfg.input_bits is None:
        return 1.0
    r = input_full_scale(layer)
    return float(torch.tensor(r, dtype=torch.float32) / (2 ** cfg.input_bits - 1))


def input_full_scale(layer) -> float:
    cfg = layer.config
    if cfg.input_range is not None:
        return float(cfg.input_range)
    if not layer.input_range.numel():
        raise CalibrationNeeded(
            f"crossbar layer {layer.layer_name!r} has no calibrated input range: call "
            "crossbar_torch.calibrate(model, batch) or set input_range in the config")
    return float(layer.input_range[0])


def adc_steps(layer, pmax: torch.Tensor | None = None) -> torch.Tensor:
    """Rule 18: the ADC step of each cell (c,) float64, from the full or calibrated range of
    its slice (``pmax``: ranges being calibrated now, per cell)."""
    cfg = layer.config
    signed = cfg.adc_scope == "weight"
    c = 1 if signed else cfg.cells_per_weight
    if cfg.adc_bits is None:
        return torch.ones(c, dtype=torch.float64)
    if cfg.adc_range == "full":
        if signed:
            r = cfg.rows * cfg.qmax * (2 ** cfg.input_bits - 1)
        else:
            top = (2 ** cfg.input_bits_per_cycle - 1 if cfg.input_bits is not None
                   else input_full_scale(layer))
            r = cfg.rows * (2 ** cfg.bits_per_cell - 1 + cfg.g0) * top
        return torch.full((c,), adc_step(r, cfg.adc_bits, signed), dtype=torch.float64)
    if pmax is not None:
        ranges = slice_ranges(layer, pmax)
    elif layer.adc_range.numel():
        ranges = layer.adc_range.tolist()
    else:
        raise CalibrationNeeded(
            f"crossbar layer {layer.layer_name!r} has no calibrated ADC range: call "
            "crossbar_torch.calibrate(model, batch) or set adc_range='full'")
    sl = [0] if signed else cell_slices(cfg)
    return torch.tensor([adc_step(ranges[s], cfg.adc_bits, signed) for s in sl],
                        dtype=torch.float64)


def slice_ranges(layer, pmax: torch.Tensor) -> list:
    """Calibrated ADC range per slice: the largest partial sum of its cells (both arrays)."""
    cfg = layer.config
    if cfg.adc_scope == "weight":
        return [float(pmax.max())]
    out = [0.0] * cfg.slices
    for i, s in enumerate(cell_slices(cfg)):
        out[s] = max(out[s], float(pmax[i]))
    return out


def _quantize(layer, x: torch.Tensor, s_x: float) -> torch.Tensor:
    """Rule 17: xq in float32 arithmetic, returned as float64 (the raw x with an ideal DAC)."""
    bits = layer.config.input_bits
    x = x.to(torch.float32)
    if bits is None:
        return x.to(torch.float64)
    top = 2 ** bits - 1
    return torch.clamp(torch.round(x / torch.tensor(s_x, dtype=torch.float32)), -top,
                       top).to(torch.float64)


def _cells_and_weights(layer, cells):
    """(g (out, c, K) float32, w_i (c,), encoding offset, g0) for the layer's scope."""
    cfg = layer.config
    if cfg.adc_scope == "weight":
        held = layer.cells if cells is None else cells
        g = ops.decode(held, cfg.weight_bits, cfg.bits_per_cell, cfg.encoding_id).to(
            torch.float32)[:, None, :]                                  # q_eff, sorted order
        return g, torch.ones(1, dtype=torch.float64), 0.0, 0.0
    w_cells, offset = cell_weights(cfg)
    return conductances(layer, cells=cells), w_cells, offset, cfg.g0


def linear_weight(layer, cells: torch.Tensor | None = None) -> torch.Tensor:
    """Rule 20's linear path: W_g[o, k] = sum_i w_i (g - g0) - offset in float64, original
    order, shaped like the layer's weight. Cached while the cells, their programming errors
    and drift are unchanged and there is no read noise (which draws anew each forward)."""
    cfg = layer.config
    stamp = None
    if cells is None and not cfg.read_noise:
        # set_cells / load_state_dict / .to() clear the cache; in-place edits bump a version
        stamp = tuple((id(t), t._version) for t in (layer.cells, layer.prog_eps, layer.drift_nu,
                                                     layer.sort_index))
        cached = getattr(layer, "_linear_cache", None)
        if cached is not None and cached[0] == stamp:
            return cached[1]
    g, w_cells, offset, g0 = _cells_and_weights(layer, cells)
    wg = ((g.to(torch.float64) - g0) * w_cells.to(g.device)[None, :, None]).sum(1) - offset
    w = torch.empty_like(wg).scatter_(1, layer.sort_index, wg).reshape(layer._weight_shape())
    if stamp is not None:
        layer._linear_cache = (stamp, w)
    return w


def layer_output(layer, x: torch.Tensor, rows_fn, linear_fn, groups: int = 1,
                 calibrating: bool = False, cells: torch.Tensor | None = None,
                 conv_fn=None) -> torch.Tensor:
    """The analog output rows (N, out) float32 of the layer for its input ``x``, no bias.

    ``rows_fn(x)``: the input rows (N, groups * K) the crossbar sees (im2col for a
    convolution); ``linear_fn(x64, w64)``: the layer's op in float64 with weight ``w64``, as
    rows (N, out). ``cells``: levels to compute with instead of the held ones. ``conv_fn(x, w)``
    (ungrouped convolutions): the convolution as rows, which lets ``adc_scope="weight"`` run one
    convolution per section over the channels it spans instead of im2col."""
    cfg = layer.config
    if calibrating:
        _calibrate_input(layer, x)
    s_x = input_scale(layer, x)
    scale = layer.scale.to(torch.float64)
    if cfg.adc_bits is None:  # linear: the shift-and-add collapses into one float64 op
        acc = linear_fn(_quantize(layer, x, s_x), linear_weight(layer, cells))
    elif cfg.adc_scope == "weight":  # ideal whole weights: partial sums by GEMMs
        acc = _weight_scope(layer, x, rows_fn, groups, s_x, cells, calibrating, conv_fn)
    else:
        rows = rows_fn(x).to(torch.float32).contiguous()
        g, w_cells, offset, g0 = _cells_and_weights(layer, cells)
        pmax = None
        if calibrating and cfg.adc_range == "calibrated":
            _, pmax = _matmul(layer, rows, g, w_cells, torch.ones_like(w_cells), groups, s_x, 0,
                              g0, offset)
        acc, _ = _matmul(layer, rows, g, w_cells, adc_steps(layer, pmax), groups, s_x,
                         cfg.adc_bits, g0, offset)
        if pmax is not None:
            layer.adc_range = torch.tensor(slice_ranges(layer, pmax), dtype=torch.float64,
                                           device=layer.cells.device)
    return (acc * (s_x * scale)[None, :]).to(torch.float32)


def _weight_scope(layer, x, rows_fn, groups, s_x, cells, calibrating, conv_fn=None):
    """Rule 18 with ``adc_scope = "weight"``: P[n, o, s] = sum over the rows of section s of
    q_eff * xq, one signed ADC per section, summed. The sections are GEMMs over the inputs: a
    slice of K each without sorting (for an ungrouped convolution, one convolution over the
    channels the section spans), one masked GEMM per section with it. Exact: every partial
    sum is an integer below 2**24 in float32 (float64 when it could be larger), the step a
    power of two, and the codes are added as integers."""
    cfg = layer.config
    held = layer.cells if cells is None else cells
    q_sorted = ops.decode(held, cfg.weight_bits, cfg.bits_per_cell, cfg.encoding_id)
    out, K = q_sorted.shape
    q = torch.empty_like(q_sorted).scatter_(1, layer.sort_index, q_sorted)   # original order
    bound = cfg.rows * cfg.qmax * (2 ** cfg.input_bits - 1)
    dt = torch.float32 if bound < 2 ** 24 else torch.float64
    identity = bool((layer.sort_index == torch.arange(K, device=q.device)).all())
    sections = [(k0, min(K, k0 + cfg.rows)) for k0 in range(0, K, cfg.rows)]
    if identity and conv_fn is not None and groups == 1:
        xq = _quantize(layer, x, s_x).to(dt)                  # (B, C, H, W), no im2col
        per_channel = K // x.shape[1]
        qc = q.to(dt).view(out, x.shape[1], -1)

        def partial(k0, k1):
            c0, c1 = k0 // per_channel, -(-k1 // per_channel)
            w = qc[:, c0:c1].reshape(out, -1).clone()
            w[:, :k0 - c0 * per_channel] = 0                  # the section's rows only
            w[:, k1 - c0 * per_channel:] = 0
            return conv_fn(xq[:, c0:c1], w.view(out, c1 - c0, *layer.kernel_size))
    else:
        xq = _quantize(layer, rows_fn(x), s_x).to(dt)         # (N, groups * K)
        N, per = xq.shape[0], out // groups
        xg = xq.view(N, groups, K).transpose(0, 1)            # (groups, N, K)
        if not identity:
            section = torch.empty_like(layer.sort_index).scatter_(
                1, layer.sort_index, torch.arange(K, device=q.device).expand(out, K)
                .contiguous()) // cfg.rows                   # section of each original k

        def partial(k0, k1):
            if identity:
                w = q[:, k0:k1].to(dt).view(groups, per, k1 - k0)
                p = torch.bmm(xg[:, :, k0:k1], w.transpose(1, 2))
            else:
                w = torch.where(section == k0 // cfg.rows, q, torch.zeros_like(q)).to(dt)
                p = torch.bmm(xg, w.view(groups, per, K).transpose(1, 2))
            return p.transpose(0, 1).reshape(N, out)
    parts = [partial(k0, k1) for k0, k1 in sections]
    if not parts:
        n = rows_fn(x).shape[0]
        return torch.zeros(n, out, dtype=torch.float64, device=x.device)
    if calibrating and cfg.adc_range == "calibrated":
        top = max(float(p.abs().max()) if p.numel() else 0.0 for p in parts)
        layer.adc_range = torch.tensor([top], dtype=torch.float64, device=layer.cells.device)
    step = float(adc_steps(layer)[0])
    hi = float(2 ** (cfg.adc_bits - 1) - 1)
    codes = None
    for p in parts:  # integer codes, added exactly (|sum| < sections * 2**(A-1))
        c = p.div_(step).round_().clamp_(-hi, hi)
        codes = c if codes is None else codes.add_(c)
    return codes.to(torch.float64) * step


def _matmul(layer, x, g, w_cells, steps, groups, s_x, adc_bits, g0, offset):
    cfg = layer.config
    return ops.analog_matmul(x, g, layer.sort_index, w_cells.to(x.device), steps.to(x.device),
                             groups, cfg.rows, cfg.input_bits or 0, cfg.input_bits_per_cycle,
                             s_x, adc_bits, g0, offset, cfg.adc_scope == "weight")


def _calibrate_input(layer, x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"calibrate: the input of layer {layer.layer_name!r} holds NaN or Inf")
    cfg = layer.config
    # a DAC, or a full-range ADC fed with real inputs, needs the input's full scale (rule 18)
    if cfg.input_range is None and (cfg.input_bits is not None or (
            cfg.adc_bits is not None and cfg.adc_range == "full")):
        top = float(x.abs().max()) if x.numel() else 0.0
        layer.input_range = torch.tensor([top if top > 0 else 1.0], dtype=torch.float32,
                                         device=layer.cells.device)


# ---- calibration (rule 20) ---------------------------------------------------------------------

_CALIBRATING = []


def is_calibrating() -> bool:
    return bool(_CALIBRATING)


@contextlib.contextmanager
def _calibration():
    _CALIBRATING.append(True)
    try:
        yield
    finally:
        _CALIBRATING.pop()


@torch.no_grad()
def calibrate(model: nn.Module, batch=None, run=None) -> dict:
    """Rule 20: set every analog layer's input and ADC ranges from one batch, in model order.
    ``batch``: a tensor (``model(batch)``), a dict (``model(**batch)``) or a tuple / list
    (``model(*batch)``); or ``run(model)`` runs the model however it is run (e.g. a sentence
    encoder). Returns ``{layer name: {"input_range": [r], "adc_range": [per slice]}}``.
    With ``feedback`` configured (rule 21) the same run stores each layer's input second moment
    ``input_moment``; then ``crossbar_torch.reprogram(model)`` programs with it."""
    from .modules import crossbar_layers
    layers = crossbar_layers(model)
    if not layers:
        from .conversion import no_crossbar_layers
        raise no_crossbar_layers(model, "calibrate")
    if (batch is None) == (run is None):
        raise ValueError("calibrate: give a batch or a run(model) callable (one of them)")
    tensors = [] if batch is None else [batch] if isinstance(batch, torch.Tensor) else (
        list(batch.values()) if isinstance(batch, dict) else list(batch))
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    if batch is not None and (not tensors or any(t.numel() == 0 or t.shape[0] == 0
                                                 for t in tensors)):
        raise ValueError("calibrate: the batch is empty; give at least one sample")
    for t in tensors:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"calibrate: the batch holds {int((~torch.isfinite(t)).sum())} "
                             "NaN or Inf value(s)")
    old = [(layer.input_range, layer.adc_range) for _, layer in layers]
    for _, layer in layers:  # forget old ranges: calibrate from this batch only
        layer.input_range = layer.input_range.new_zeros(0)
        layer.adc_range = layer.adc_range.new_zeros(0)
    was = model.training
    model.eval()
    try:
        from ..feedback import collect_moments, needs_moments
        # rule 21: the same run records every layer's input second moment when the config asks
        # for feedback, or, to check the layers' output error (warn_output_error), when it
        # sticks cells (then the moments are dropped after the check)
        cfg0 = layers[0][1].config
        keep = needs_moments(model)
        check = keep or (cfg0.stucking_anywhere and cfg0.warn_output_error > 0)
        saved = [l.input_moment for _, l in layers]
        moments = collect_moments(layers) if check else contextlib.nullcontext()
        with _calibration(), moments:
            if run is not None:
                run(model)
            elif isinstance(batch, dict):
                model(**batch)
            elif isinstance(batch, (tuple, list)):
                try:
                    model(*batch)
                except TypeError as e:  # e.g. a DataLoader batch [images, labels]
                    raise TypeError(
                        f"calibrate: model(*batch) with a {type(batch).__name__} of "
                        f"{len(batch)} item(s) failed ({e}); a tuple / list is passed as the "
                        "model's positional arguments: for a DataLoader batch (images, labels) "
                        "pass batch[0]") from e
            else:
                model(batch)
    except BaseException:  # a failed calibration keeps the previous ranges
        for (_, layer), (r_in, r_adc) in zip(layers, old):
            layer.input_range, layer.adc_range = r_in, r_adc
        raise
    finally:
        model.train(was)
    if check:
        from ..feedback import warn_output_errors
        warn_output_errors(model, "calibrate")
        if not keep:  # measured for the warning only
            for (_, layer), m in zip(layers, saved):
                layer.input_moment = m
    return {name: {"input_range": l.input_range.tolist(), "adc_range": l.adc_range.tolist()}
            for name, l in layers}


def calibrate_from_loader(model: nn.Module, loader, device, images: int = 8) -> int:
    """Rule 20 for the scripts: calibrate on the first ``images`` readable images of ``loader``
    (batches of ``(images, labels, ...)`` or :class:`~crossbar_torch.apps.data.Batch`). Returns the
    number of images used."""
    got, n = [], 0
    for batch in loader:
        x = batch.images if hasattr(batch, "images") else batch[0]
        if x is None or not x.shape[0]:
            continue
        got.append(x[:images - n])
        n += got[-1].shape[0]
        if n >= images:
            break
    if not n:
        raise ValueError("calibrate: no readable image to calibrate the analog ranges on")
    calibrate(model, torch.cat(got).to(device))
    return n


# ---- programming noise and drift (rule 19) --------------------------------------------------------

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

