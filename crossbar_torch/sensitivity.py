"""How much a layer's output error moves the model's output (the allocator's ``embedding``
sensitivity, crossbar_torch/allocate.py), to first order, measured once on the float model.

A crossbar layer computes ``y = W_eff x = W x + E x`` (``E = W_eff - W``) for every row ``x``
it reads (a token, for a transformer's Linear layer). Split ``x = mu + d`` with ``mu`` the
mean input row: ``E mu`` is the *same* error in every row, ``E d`` varies from row to row. The
model's output ``Z`` moves by ``sum_rows J_row (E x_row)`` (``J`` its Jacobian with respect to
the layer's output), so the shared part adds up coherently over the rows a sentence pools
(``||sum_rows J_row||``) while the rest adds up in energy (``||J||_F``). Taking each part's
direction in the layer's output as isotropic,

    ||dZ||^2 / ||Z||^2 ~ coherent * ||E mu||^2 + spread * (tr(E H E^T) - ||E mu||^2),
    spread = ||J||_F^2 / (out * ||Z||^2),  coherent = ||sum_rows J_row||_F^2 / (out * ||Z||^2),

with ``H = E[x x^T]`` (rule 21's moment; ``tr(E H E^T) - ||E mu||^2`` is the varying part's
energy). The shared part gets its own term because the mechanism of docs/transformers.md
(errors that line up and add in the output) is a large ``E mu``.

What it is good for: ranking layers against each other. On all-mpnet-base-v2 (rule 23
candidates, docs/transformers.md) the allocator's policy at 8.6x fewer writes kept a mean
embedding cosine of 0.9954 with these gains and 0.945 with the relative output error at 8.1x.
What it is not: a calibrated prediction. There the summed prediction was about 1/17 of the
measured squared embedding error (the errors of different layers are not independent, nor
isotropic in a layer's output), and the shared term changed it by under 10%.

The norms are Hutchinson estimates (``mean ||J^T r||^2`` over seeded standard normal probes
``r``, one backward pass each) or exact (one backward pass per element of ``Z``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn

from .nn.gains import measuring


@dataclass
class LayerGain:
    """One Linear layer's first-order share of the output's relative squared error."""
    spread: float        # ||J||_F^2 / (out ||Z||^2)
    coherent: float      # ||sum_rows J_row||_F^2 / (out ||Z||^2)
    mean: torch.Tensor   # float64 (in_features,): the mean input row on the gain inputs

    def error(self, e: torch.Tensor, energy: float) -> float:
        """Predicted relative squared output error for the layer's weight error ``e``
        (``(out, in)``) whose output error energy per row is ``energy = tr(E H E^T)``."""
        shared = float((e.double() @ self.mean).pow(2).sum())
        return self.spread * max(energy - shared, 0.0) + self.coherent * shared


def output_gains(model: nn.Module, forward: Callable[[nn.Module], torch.Tensor],
                 names: Sequence[str], probes: Optional[int] = 4,
                 seed: int = 0) -> Dict[str, LayerGain]:
    """Per Linear layer in ``names`` (modules of the float ``model``): its ``LayerGain`` for
    ``Z = forward(model)`` (differentiable; every call of a layer counts, its rows together).
    ``probes=None``: exact norms (one backward pass per element of ``Z``: small outputs only).
    The model's parameters get no gradient; its mode and ``requires_grad`` flags are kept."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"output_gains: no module named {missing[:3]}")
    other = [n for n in names if not isinstance(modules[n], nn.Linear)]
    if other:  # a convolution's rows are im2col patches: not measured here
        raise ValueError(f"output_gains: Linear layers only, not {other[:3]}")
    outs: Dict[str, list] = {n: [] for n in names}
    sums = {n: torch.zeros(modules[n].in_features, dtype=torch.float64) for n in names}
    rows = dict.fromkeys(names, 0)

    def pre_for(name):
        def pre(mod, args):
            x = args[0]
            flat = x.detach().reshape(-1, x.shape[-1]).double()
            sums[name] += flat.sum(0).cpu()
            rows[name] += flat.shape[0]
            if x.is_floating_point() and not x.requires_grad:  # so later outputs have a graph
                return (x.detach().requires_grad_(),) + tuple(args[1:])
            return None
        return pre

    def post_for(name):
        def post(mod, args, out):
            out.retain_grad()
            outs[name].append(out)
        return post

    handles = []
    for n in names:
        handles.append(modules[n].register_forward_pre_hook(pre_for(n)))
        handles.append(modules[n].register_forward_hook(post_for(n)))
    spread, coherent = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    with measuring(model, handles):
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.enable_grad():
            z = forward(model)
            zz = float(z.detach().double().pow(2).sum())
            g = torch.Generator().manual_seed(seed)
            count = z.numel() if probes is None else probes
            for i in range(count):
                if probes is None:
                    r = torch.zeros(z.numel(), dtype=z.dtype)
                    r[i] = 1.0
                    r = r.reshape(z.shape)
                else:
                    r = torch.randn(z.shape, generator=g, dtype=z.dtype)
                for tensors in outs.values():
                    for t in tensors:
                        t.grad = None
                z.backward(r.to(z.device), retain_graph=i < count - 1)
                for n, tensors in outs.items():
                    grads = [t.grad.double().reshape(-1, t.shape[-1]) for t in tensors
                             if t.grad is not None]
                    if grads:
                        spread[n] += sum(float(gr.pow(2).sum()) for gr in grads)
                        coherent[n] += float(sum(gr.sum(0) for gr in grads).pow(2).sum())
    per = 1.0 if probes is None else 1.0 / max(count, 1)  # a basis sums, probes average
    gains = {}
    for n in names:
        scale = per / (modules[n].out_features * zz) if zz > 0 else 0.0
        gains[n] = LayerGain(spread[n] * scale, coherent[n] * scale,
                             sums[n] / max(rows[n], 1))
    return gains
