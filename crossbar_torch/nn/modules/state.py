"""A crossbar layer's state: the checks of its state dict on load (a buffer no programming can
have produced, a tampered or corrupt file, is refused naming the layer and the buffer, before
anything is copied), and whether rule 21 programs it (:func:`feedback_active`)."""
from __future__ import annotations

import torch

from ...mapping import layer_tiles
from ...packing import is_canonical, pack_levels, pack_mask, packed_width


def feedback_active(layer, config) -> bool:
    """Rule 21 applies to a layer once it is calibrated and, with stucking, once a programming
    has told which of its cells are held and at what level."""
    return (config.feedback != "none" and layer.input_moment.numel() > 0
            and (not config.stucking or layer.stuck.numel() > 0))


def policy_name(layer, name: str) -> str:
    """The name rule 22's patterns are matched against: the one ``convert`` gave the layer,
    which stays when the model is wrapped later (sentence distillation wraps it), else (a layer
    built directly) ``name``, its name in the model at hand."""
    return name if layer.layer_name == type(layer).__name__ else layer.layer_name


def layer_policy(layer, name: str):
    """The config ``layer`` (``name`` in the model at hand) is programmed with: its own, with
    the rule-22 overrides that match its policy name applied."""
    return layer.config.for_layer(policy_name(layer, name))


def check_loaded_buffers(module, state_dict, prefix: str, layer: str) -> None:
    """Refuse a loaded buffer that no programming can have produced (a tampered or corrupt
    file), naming the layer and the buffer, before anything is copied: load_state_dict
    would otherwise cast dtypes silently (int64 levels wrapping into uint8) and the errors
    would surface later, far from their cause. filter_index is checked by the caller.
    ``cells`` and ``stuck`` saved one byte per cell (before issue 19) are packed in
    ``state_dict`` here, once checked (docs/checkpoints.md)."""
    cfg = module.config
    out, k, width = module.cells.shape
    c = cfg.cells_per_weight
    top = (1 << cfg.bits_per_cell) - 1

    def bad(name, why):
        raise RuntimeError(f"crossbar layer {layer}: buffer '{name}' {why}")

    def loaded(name, dtypes, shapes):
        t = state_dict.get(prefix + name)
        if t is None:  # missing keys are load_state_dict's to report
            return None
        if not isinstance(t, torch.Tensor):
            bad(name, f"must be a tensor, got {type(t).__name__}")
        if t.dtype not in dtypes:
            bad(name, f"must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
        if tuple(t.shape) not in shapes:
            bad(name, f"must have shape {' or '.join(map(str, shapes))}, got "
                      f"{tuple(t.shape)}")
        return None if t.is_meta else t  # meta tensors hold no values to check

    scale = loaded("scale", (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                   [(out,)])
    if scale is not None and scale.numel():
        if not bool(torch.isfinite(scale).all()):
            bad("scale", f"holds {int((~torch.isfinite(scale)).sum())} NaN or Inf value(s)")
        if not bool((scale > 0).all()):
            bad("scale", f"holds {int((scale <= 0).sum())} value(s) <= 0 (min "
                         f"{float(scale.min())}); quantization scales are positive")
    # packed (out, K, P), or one byte per cell (out, K, c) as saved before issue 19: packed here
    cells = loaded("cells", (torch.uint8,), [(out, k, width), (out, k, c)])
    if cells is not None and cells.numel():
        if cells.shape[2] == c:  # one level a byte (the same bytes as packed when P == c)
            if int(cells.max()) > top:
                bad("cells", f"holds level {int(cells.max())} but a cell with bits_per_cell="
                             f"{cfg.bits_per_cell} holds levels in [0, {top}]")
            state_dict[prefix + "cells"] = pack_levels(cells, cfg.bits_per_cell)
        elif not is_canonical(cells, c, cfg.bits_per_cell):
            bad("cells", f"is not a packing of {c} cells of {cfg.bits_per_cell} bit(s) per "
                         "weight: bits past the last cell are set")
    # packed uint8 (out, K, Q), or bool one flag a byte (out, K, c) as saved before issue 19
    stuck = state_dict.get(prefix + "stuck")
    if isinstance(stuck, torch.Tensor) and stuck.dtype == torch.bool:
        stuck = loaded("stuck", (torch.bool,), [(0,), (out, k, c)])
        if stuck is not None:
            state_dict[prefix + "stuck"] = (pack_mask(stuck) if stuck.numel()
                                            else stuck.to(torch.uint8))
    else:
        stuck = loaded("stuck", (torch.uint8,), [(0,), (out, k, packed_width(c, 1))])
        if stuck is not None and stuck.numel() and not is_canonical(stuck, c, 1):
            bad("stuck", f"is not a packing of {c} flags per weight: bits past the last "
                         "cell are set")
    # int64: the format before the narrow index (narrowed on load, once it is checked)
    index = loaded("sort_index", (torch.int16, torch.int32, torch.int64), [(out, k)])
    if index is not None and index.numel():
        rows = torch.arange(k).expand(out, k)
        bad_rows = (index.cpu().sort(dim=1).values != rows).any(1).nonzero().flatten()
        if bad_rows.numel():
            bad("sort_index", f"is not a permutation of each row: row {int(bad_rows[0])} "
                              f"(of {bad_rows.numel()} bad rows) is not a permutation of "
                              f"[0, {k})")
    groups = module.moment_groups
    moment = loaded("input_moment", (torch.float32,), [(0,), (groups, k, k)])
    if moment is not None and moment.numel() and not bool(torch.isfinite(moment).all()):
        bad("input_moment", "holds NaN or Inf")
    gain = loaded("output_gain", (torch.float64,), [(0,), (out,)])  # rule 26
    if gain is not None and gain.numel() and not bool((torch.isfinite(gain) & (gain >= 0)).all()):
        bad("output_gain", "holds NaN, Inf or a negative value")
    tiles = layer_tiles(out, k, cfg)
    order = loaded("tile_order", (torch.int64,), [(0,), (tiles,)])
    if order is not None and order.numel() and not torch.equal(
            order.cpu().sort().values, torch.arange(tiles)):
        bad("tile_order", f"is not a permutation of the layer's {tiles} tiles")
