"""Training checkpoints: atomic save / load, the state a resume needs (without the derived
crossbar buffers), their fingerprint, pruning of old checkpoints, and the stuck-cell checks."""
from __future__ import annotations

import hashlib
import os
import re
from typing import Any

import torch
import torch.nn as nn

from ...config import atomic_write
from ...nn.modules import crossbar_layers

CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)\.pt")

# crossbar buffers a training checkpoint leaves out (rebuilt on resume by converting the same
# float model; training never changes them)
DERIVED_BUFFERS = ("cells", "stuck", "sort_index")
CHECKPOINT_FORMAT = "crossbar_torch.finetune/2"


def atomic_torch_save(obj: Any, path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then ``os.replace``."""
    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def load_checkpoint(path) -> dict:
    """Load a checkpoint written by :class:`Trainer` (tensors and plain containers only).
    A missing, unreadable or truncated file raises an error naming it."""
    from ..checkpoint import WeightLoadError, read_checkpoint
    ck = read_checkpoint(path, "checkpoint")
    if not isinstance(ck, dict) or not {"model", "step", "optimizer"} <= set(ck):
        raise WeightLoadError(f"checkpoint {os.fspath(path)!r} is not a training checkpoint of "
                              "crossbar_torch.apps.finetune (expected the keys 'model', 'step', "
                              "'optimizer')")
    return ck


def derived_keys(model: nn.Module) -> list:
    """State-dict keys of the derived crossbar buffers (:data:`DERIVED_BUFFERS`)."""
    return [f"{name}.{leaf}" if name else leaf
            for name, _ in crossbar_layers(model) for leaf in DERIVED_BUFFERS]


def resume_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` without the derived crossbar buffers (:data:`DERIVED_BUFFERS`)."""
    drop = set(derived_keys(model))
    return {k: v for k, v in model.state_dict().items() if k not in drop}


@torch.no_grad()
def crossbar_fingerprint(model: nn.Module) -> str:
    """SHA-256 of every crossbar layer's derived buffers (cells, stuck mask, sort index,
    scales): equal fingerprints mean the same programmed crossbars."""
    h = hashlib.sha256()
    for name, layer in crossbar_layers(unwrap(model)):
        h.update(name.encode() + b"\0")
        for leaf in DERIVED_BUFFERS + ("scale",):
            # hashed in the forms stored before issue 19 (one byte per cell, the int64 index),
            # whatever the stored packing and width: older checkpoints' fingerprints still match
            t = (layer.held_cells() if leaf == "cells" else
                 layer.stuck_cells() if leaf == "stuck" else getattr(layer, leaf))
            t = t.detach().cpu().contiguous()
            if leaf == "sort_index":
                t = t.long()
            h.update(f"{leaf}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (else the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model



@torch.no_grad()
def stuck_snapshot(model: nn.Module) -> dict:
    """``{layer name: (stuck mask, levels the stuck cells hold)}`` of every crossbar layer."""
    snap = {}
    for name, layer in crossbar_layers(unwrap(model)):
        if layer.stuck.numel():
            mask = layer.stuck_cells()
            snap[name] = (mask, layer.held_cells()[mask])
    return snap


@torch.no_grad()
def check_stuck_cells(model: nn.Module, snapshot: dict, *, simulated: bool = False) -> int:
    """Check that every stuck cell of ``snapshot`` is still stuck and holds the same level.

    Checks the programmed ``cells`` buffers and, with ``simulated``, also what train mode
    computes with (the target cells of the current latent weight with the stuck cells kept).
    Returns the number of stuck cells checked; raises ``AssertionError`` on a mismatch.
    """
    n = 0
    layers = dict(crossbar_layers(unwrap(model)))
    for name, (mask, levels) in snapshot.items():
        layer = layers[name]
        if not torch.equal(layer.stuck_cells(), mask):
            raise AssertionError(f"{name}: the stuck-cell mask changed")
        held = layer.held_cells()
        if not torch.equal(held[mask], levels):
            raise AssertionError(f"{name}: a stuck cell changed its level")
        if simulated:
            target = torch.where(mask, held, layer.target_cells())
            if not torch.equal(target[mask], levels):
                raise AssertionError(f"{name}: train mode changed a stuck cell's level")
        n += int(mask.sum())
    return n



def checkpoint_path(out_dir, step: int) -> str:
    """``<out_dir>/checkpoint-<step>.pt`` (seven digits: names sort by step)."""
    return os.path.join(out_dir, f"checkpoint-{step:07d}.pt")


def prune_checkpoints(out_dir, keep: int, newest) -> None:
    """Keep the last ``keep`` ``checkpoint-<step>.pt`` of ``out_dir`` (0: keep all); never
    deletes ``newest``."""
    if not keep:
        return
    found = sorted((int(m.group(1)), f) for f in os.listdir(out_dir)
                   if (m := CHECKPOINT_NAME.fullmatch(f)))
    for _, f in found[:-keep]:
        p = os.path.join(out_dir, f)
        if os.path.abspath(p) != os.path.abspath(newest):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
