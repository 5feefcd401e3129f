"""Which cells of a layer sit on stuck positions (its ``stuck`` buffer, rule 7), kept across
programmings: a reprogramming replays a layer's masks, first tile, placement and tile order
(rules 7, 11, 12), so the flags it would compute are the ones the layer holds, and computing
them again took a third of a second of a reprogramming of the ViT-Base-sized model."""
from __future__ import annotations

import weakref

import torch

# layer -> what its `stuck` buffer was computed from (_source), while that holds
_sources = weakref.WeakKeyDictionary()


def _source(pool, layer, t0: int, cfg) -> tuple | None:
    """What ``pool.layer_stuck`` of ``layer`` depends on: the pool's config (its masks' draws),
    the layer's mask (rule 22's L and p), its first tile, and its placement and stored stuck
    flags as objects and versions (an in-place edit or a new tensor changes them); the tile
    order is compared by value. None for inference tensors (no version counter to stamp)."""
    buffers = (layer.filter_index, layer.stuck)
    if any(b.is_inference() for b in buffers):
        return None
    stamp = tuple((weakref.ref(b), b._version) for b in buffers)
    return (pool.config, pool._mask_key(cfg), t0, stamp)


def stuck_flags(pool, layer, geom, order: torch.Tensor, t0: int, cfg) -> torch.Tensor | None:
    """``pool.layer_stuck`` (a ``programming.CrossbarPool``) for ``layer`` programmed with
    ``order`` from tile ``t0`` under its ``cfg`` (None without stucking), or the layer's own
    ``stuck`` buffer when it was computed from the same masks, first tile, placement and tile
    order (``remember_stuck_flags``)."""
    if not cfg.stucking:
        return None
    known = _sources.get(layer)
    if known is not None:  # (an inference tensor's layer has none: _source)
        config, key, first, stamp = known
        if (first == t0 and key == pool._mask_key(cfg) and config == pool.config
                and all(ref() is b and v == b._version
                        for (ref, v), b in zip(stamp, (layer.filter_index, layer.stuck)))
                and torch.equal(order.to(layer.tile_order.device), layer.tile_order)):
            return layer.stuck
    return pool.layer_stuck(geom, layer.filter_index, order, t0, cfg)


def remember_stuck_flags(pool, layer, t0: int, cfg) -> None:
    """After ``layer.set_cells``: what its ``stuck`` buffer was computed from (nothing without
    stucking, or for inference tensors)."""
    source = _source(pool, layer, t0, cfg) if cfg.stucking and layer.stuck.numel() else None
    if source is None:
        _sources.pop(layer, None)
    else:
        _sources[layer] = source
