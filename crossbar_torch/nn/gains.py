"""Rule 26's output gains (docs/semantics.md): how much the model's output depends on each output
channel of each crossbar layer, measured on the float model (every crossbar layer computing with
its latent weight) by Hutchinson's estimator, and kept in each layer's ``output_gain`` buffer
(float64 (out,)), which ``filter_weight: gain`` weighs rules 23 and 24 by."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from ..errors import InvalidTensorError, UserInputError
from ..heap import release_free_memory
from ..threads import OneThreadEach, one_thread
from .analog import latent_weights
from .modules import CrossbarConv2d, crossbar_layers
from .modules.state import layer_policy
from .record import no_crossbar_layers

GAIN_PROBES = 8  # rule 26's default P: the estimate's relative spread is about 1 / sqrt(P rows)


def needs_gains(model: nn.Module) -> bool:
    """Whether any crossbar layer of ``model`` is weighed by its output gains (rule 26)."""
    return any(layer_policy(layer, name).filter_weight == "gain"
               for name, layer in crossbar_layers(model))


@contextlib.contextmanager
def measuring(model: nn.Module, handles):
    """Within: ``model`` in eval mode, free to change its parameters' ``requires_grad``. On the
    way out, whatever happened: the hook ``handles`` removed, every flag and the mode as they
    were (the model is the user's; measuring it leaves no trace)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was = model.training
    model.eval()
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was)


def rademacher_probes(shape, probes: int, seed: int):
    """Rule 26's probes: ``probes`` tensors of ``shape``, each entry -1 or +1 (float32), drawn in
    order from one CPU ``torch.Generator`` seeded with ``seed`` (``randint(0, 2) * 2 - 1``): the
    same on every device."""
    gen = torch.Generator().manual_seed(int(seed))
    for _ in range(probes):
        yield torch.randint(0, 2, tuple(shape), generator=gen).to(torch.float32) * 2 - 1


def calibrate_gains(model: nn.Module, run, probes: int = GAIN_PROBES,
                    seed: int | None = None) -> dict:
    """Rule 26: every crossbar layer's ``output_gain[o] = (1 / P) sum_p sum_rows
    (d <Z, r_p> / d y[row, o])^2``, where ``Z = run(model)`` is the model's output on
    calibration data (a tensor, differentiable: not under ``torch.no_grad``), ``y`` the layer's
    output (channel ``o``; rows: every other index), the derivatives those of the float model
    (every crossbar layer computes with its latent weight while ``run`` runs, in eval mode) and
    ``r_p`` the ``P = probes`` Rademacher probes (:func:`rademacher_probes`, ``seed`` default
    the config's). Its expectation is the channel's Jacobian energy ``sum_rows sum_j
    (dZ_j / dy[row, o])^2``. Returns ``{layer name: gains}`` (on the host)."""
    layers = crossbar_layers(model)
    if not layers:
        raise no_crossbar_layers(model, "calibrate_gains")
    if not callable(run):
        raise UserInputError(f"calibrate_gains: run must be a callable run(model) returning the "
                             f"model's output, got {type(run).__name__}")
    if isinstance(probes, bool) or not isinstance(probes, int) or not 1 <= probes <= 4096:
        raise UserInputError(f"calibrate_gains: probes must be an integer in [1, 4096], got "
                             f"{probes!r}")
    seed = layers[0][1].config.seed if seed is None else seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise UserInputError(f"calibrate_gains: seed must be an integer in [0, 2**63), got "
                             f"{seed!r}")
    outputs = {id(layer): [] for _, layer in layers}

    def keep(module, args, out):
        outputs[id(module)].append(out)
        # a copy goes on: an in-place op after the layer (an inplace activation) would otherwise
        # change the tensor whose derivative is taken
        return out.clone()

    handles = [layer.register_forward_hook(keep) for _, layer in layers]
    with measuring(model, handles):
        for _, layer in layers:  # every layer's output in the graph, even of a frozen model
            layer.weight.requires_grad_(True)
        # on one thread, as the probes below: the derivatives' rounding moved with the thread
        # count, and the writes of a `filter_weight: gain` preset with it (sharing the threads
        # among the crossbar layers' products, as calibrate does, was not enough: the model's
        # own ops under autograd rounded differently too)
        with torch.enable_grad(), latent_weights(), one_thread():
            z = run(model)
    if not isinstance(z, torch.Tensor) or not z.is_floating_point() or not z.numel():
        raise InvalidTensorError("calibrate_gains: run(model) must return the model's output as "
                                 f"a non-empty float tensor, got {_what(z)}")
    if not z.requires_grad:
        raise InvalidTensorError("calibrate_gains: the output run(model) returned does not "
                                 "require grad: run the model without torch.no_grad (e.g. not "
                                 "through a sentence encoder's encode())")
    if not bool(torch.isfinite(z).all()):
        raise InvalidTensorError("calibrate_gains: the model's output holds NaN or Inf")
    ys = [(name, layer, y) for name, layer in layers for y in outputs[id(layer)]]
    # summed where the layer lives: no host round trip per layer and probe on a GPU
    sums = {name: torch.zeros(layer.out_channels if isinstance(layer, CrossbarConv2d)
                              else layer.out_features, dtype=torch.float64,
                              device=layer.cells.device)
            for name, layer in layers}
    def probe_sums(r):
        """One probe's sum_rows (d <Z, r> / d y[row, o])^2 of every layer call (None for a call
        whose output does not reach Z), by one backward pass on one thread."""
        grads = torch.autograd.grad(z, [y for _, _, y in ys], grad_outputs=r.to(z),
                                    retain_graph=True, allow_unused=True)
        out = []
        for (_, layer, _), g in zip(ys, grads):
            if g is not None:
                dim = 1 if isinstance(layer, CrossbarConv2d) else -1
                g = g.detach().to(torch.float64).movedim(dim, -1)
                g = g.reshape(-1, g.shape[-1]).square().sum(0)
            out.append(g)
        # the pass's gradients (a few hundred MB on the ViT-Base-sized model) are free now:
        # give their pages back before the next pass allocates its own. Two passes side by
        # side, each thread's allocator arena kept what every pass had freed: the gains of
        # mpnet_allocated_16x_gain peaked at 12.4 GB (7.2 GB held after), 9.5 GB (2.7 GB)
        # with this and the trim at the end
        del grads
        release_free_memory()
        return out

    # on the host the probes' backward passes run side by side, each on one thread (the threads
    # share the probes, never one pass); their sums are added in probe order, as one thread
    # would (a GPU's passes do not depend on the host's threads: one after the other)
    jobs = [(r,) for r in rademacher_probes(z.shape, probes, seed)]
    if z.device.type == "cpu":
        with OneThreadEach() as threads:
            per_probe = threads.map(probe_sums, jobs)
    else:
        per_probe = [probe_sums(*job) for job in jobs]
    for calls in per_probe:
        for (name, _, _), g in zip(ys, calls):
            if g is not None:
                sums[name] += g.to(sums[name].device)
    for name, layer in layers:
        layer.output_gain = sums[name] / probes
    del z, ys, outputs, per_probe  # the graph of the forward: its pages back, as above
    release_free_memory()
    return {name: layer.output_gain.cpu() for name, layer in layers}


def _what(z) -> str:
    if isinstance(z, torch.Tensor):
        return f"a {z.dtype} tensor of shape {tuple(z.shape)}"
    return type(z).__name__
