"""Per-layer policy allocation (rule 22): pick each layer's stucking setting to cut the writes
most for a budget of output error measured on calibration data.

Each candidate setting (``{stuck_slices, reprogram_fraction, compensate, feedback,
write_penalty}``) is tried on the whole model once: convert, calibrate (the input moments
``H = E[x x^T]`` of every layer, rule 21), reprogram, count. A layer's *error* under a
candidate is one of two measures (``E = W_eff - W``):

* ``output``: its relative output error on the calibration inputs, ``tr(E H E^T) /
  tr(W H W^T)`` (what the layer adds to its output's error, per unit of its output). Summed
  over layers it treats every layer alike, which it is not: on all-mpnet-base-v2 a budget of
  1.5x the safest candidate's sum gave 8.8x fewer writes at a mean embedding cosine of 0.94
  (it gave most feed-forward layers the heaviest write penalties);
* ``embedding`` (with ``gains``, crossbar_torch/sensitivity.py): the relative squared error
  that layer's weight error makes in the model's output ``Z``, to first order, the error
  shared by every row (``E mu``, which adds up coherently over a sentence's tokens) and the
  rest weighted apart. Summed over layers it predicts the relative squared error of ``Z``
  (errors of different layers taken as uncorrelated), one scale for every layer.

Its *cost* is the writes per pass the report gives it. The allocation minimises
``sum writes + lam * sum error`` layer by layer and bisects ``lam`` until the summed error meets
the budget. Writes interact a little across layers (a tile is written over the previous one),
so the chosen policy is measured again as a whole.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch.nn as nn

from .nn.calibration import calibrate
from .config import CrossbarConfig
from .nn.conversion import convert
from .feedback import layer_output_energies, layer_output_error, weight_error
from .moments import collect_moments
from .threads import sharing_threads
from .nn.modules import crossbar_layers
from .programming import reprogram
from .report import reprogram_report
from .sensitivity import LayerGain

@dataclass
class Measured:
    """One candidate on the whole model: per layer (writes per pass, relative output error)."""
    setting: dict
    writes: Dict[str, float] = field(default_factory=dict)
    error: Dict[str, float] = field(default_factory=dict)


def layer_error(layer) -> float:
    """The layer's relative output error on its calibration inputs (rule 21's moments)."""
    return layer_output_error(layer)


def measure(model: nn.Module, base: CrossbarConfig, setting: dict,
            run: Callable[[nn.Module], object],
            gains: Optional[Dict[str, LayerGain]] = None,
            gain_run: Optional[Callable[[nn.Module], object]] = None) -> Measured:
    """Convert a copy of ``model`` with ``setting`` on every layer, calibrate it with
    ``run(model)`` (input moments always; rule 21 reprograms with them when the setting asks,
    after ``gain_run(model)``, which measures rule 26's gains where the setting weighs by them),
    and return each layer's writes per pass and error: relative output error, or with
    ``gains`` (``sensitivity.output_gains``) its predicted share of the output's error."""
    cfg = base.replace(layer_overrides=(), **setting)
    xm = convert(copy.deepcopy(model), cfg)
    layers = crossbar_layers(xm)
    if gains is not None:
        missing = [n for n, _ in layers if n not in gains]
        if missing:
            raise ValueError(f"measure: no gain for the crossbar layer(s) {missing[:3]}")
    if cfg.feedback != "none":
        calibrate(xm, run=run)
        if gain_run is not None:
            gain_run(xm)
        reprogram(xm)
    else:  # the moments only, to measure the error (programming does not read them)
        was = xm.training
        xm.eval()
        with collect_moments(layers), sharing_threads():  # as calibrate runs it
            run(xm)
        xm.train(was)
    rep = reprogram_report(xm).to_dict()
    m = Measured(dict(setting))
    for entry, (name, layer) in zip(rep["layers"], layers):
        m.writes[name] = float(entry["writes_per_pass"])
        if gains is None:
            m.error[name] = layer_error(layer)
        else:
            e = weight_error(layer)  # once: the shared error and the energy both read it
            m.error[name] = gains[name].error(e, layer_output_energies(layer, e)[0])
    del xm
    return m


def allocate(measured: Sequence[Measured], budget: float, iterations: int = 60) -> Dict[str, int]:
    """Per layer, the index of the candidate minimising ``writes + lam * error``, with the
    smallest ``lam`` (bisected) whose summed error is at most ``budget``. Ties: the earlier
    candidate. Returns {layer name: candidate index}."""
    names = list(measured[0].writes)

    def choose(lam):
        pick = {}
        for n in names:
            costs = [m.writes[n] + lam * m.error[n] for m in measured]
            pick[n] = min(range(len(measured)), key=lambda i: (costs[i], i))
        return pick

    def total_error(pick):
        return sum(measured[i].error[n] for n, i in pick.items())

    lo, hi = 0.0, 1.0
    while total_error(choose(hi)) > budget and hi < 1e30:
        hi *= 10.0
    if total_error(choose(lo)) <= budget:
        return choose(lo)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if total_error(choose(mid)) <= budget:
            hi = mid
        else:
            lo = mid
    return choose(hi)


def policy_config(base: CrossbarConfig, measured: Sequence[Measured],
                  pick: Dict[str, int]) -> CrossbarConfig:
    """``base`` with the most common choice as its own setting and one exact-name
    ``layer_overrides`` entry for every layer that differs (glob characters escaped)."""
    counts: Dict[int, int] = {}
    for i in pick.values():
        counts[i] = counts.get(i, 0) + 1
    common = max(sorted(counts), key=lambda i: counts[i])
    cfg = base.replace(layer_overrides=(), **measured[common].setting)
    overrides = {}
    for name, i in pick.items():
        if i != common:
            overrides[_escape(name)] = dict(measured[i].setting)
    return cfg.replace(layer_overrides=overrides)


def _escape(name: str) -> str:
    return "".join(f"[{ch}]" if ch in "*?[]" else ch for ch in name)


def summary(measured: Sequence[Measured], pick: Dict[str, int]) -> List[dict]:
    return [{"layer": n, "setting": measured[i].setting, "writes_per_pass": measured[i].writes[n],
             "error": measured[i].error[n]} for n, i in pick.items()]
