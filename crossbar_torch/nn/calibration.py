"""Calibration of the analog periphery (docs/semantics.md rule 20) and of rule 21's input
moments: :func:`calibrate` runs the model once on user data with every crossbar layer in
calibration mode (:func:`crossbar_torch.nn.analog.calibrating`)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from ..errors import InvalidTensorError, UserInputError
from ..feedback import needs_moments, warn_output_errors
from ..moments import collect_moments
from ..threads import sharing_threads
from .analog import calibrating
from .gains import calibrate_gains, needs_gains
from .record import no_crossbar_layers
from .modules import crossbar_layers


@torch.no_grad()
def calibrate(model: nn.Module, batch=None, run=None) -> dict:
    """Rule 20: set every analog layer's input and ADC ranges from one batch, in model order.
    ``batch``: a tensor (``model(batch)``), a dict (``model(**batch)``) or a tuple / list
    (``model(*batch)``); or ``run(model)`` runs the model however it is run (e.g. a sentence
    encoder). Returns ``{layer name: {"input_range": [r], "adc_range": [per slice]}}``.
    With ``feedback`` configured (rule 21) the same run stores each layer's input second moment
    ``input_moment``; then ``crossbar_torch.reprogram(model)`` programs with it."""
    layers = crossbar_layers(model)
    if not layers:
        raise no_crossbar_layers(model, "calibrate")
    if (batch is None) == (run is None):
        raise UserInputError("calibrate: give a batch or a run(model) callable (one of them)")
    tensors = [] if batch is None else [batch] if isinstance(batch, torch.Tensor) else (
        list(batch.values()) if isinstance(batch, dict) else list(batch))
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    if batch is not None and (not tensors or any(t.numel() == 0 or t.shape[0] == 0
                                                 for t in tensors)):
        raise InvalidTensorError("calibrate: the batch is empty; give at least one sample")
    for t in tensors:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InvalidTensorError(f"calibrate: the batch holds {int((~torch.isfinite(t)).sum())} "
                             "NaN or Inf value(s)")
    old = [(layer.input_range, layer.adc_range) for _, layer in layers]
    for _, layer in layers:  # forget old ranges: calibrate from this batch only
        layer.input_range = layer.input_range.new_zeros(0)
        layer.adc_range = layer.adc_range.new_zeros(0)
    was = model.training
    model.eval()
    try:
        # rule 21: the same run records every layer's input second moment when the config asks
        # for feedback, or, to check the layers' output error (warn_output_error), when it
        # sticks cells (then the moments are dropped after the check)
        cfg0 = layers[0][1].config
        keep = needs_moments(model)
        check = keep or (cfg0.stucking_anywhere and cfg0.warn_output_error > 0)
        saved = [l.input_moment for _, l in layers]
        moments = collect_moments(layers) if check else contextlib.nullcontext()
        # the crossbar layers' products one thread each (threads.sharing_threads): a
        # convolution's rounded differently on each thread count, and with it the next
        # layers' moments and the writes of rule 21
        with calibrating(), moments, sharing_threads():
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
    if check and not keep:  # with feedback, reprogram (which follows) warns, of its programming
        warn_output_errors(model, "calibrate")
        for (_, layer), m in zip(layers, saved):  # measured for the warning only
            layer.input_moment = m
    return {name: {"input_range": l.input_range.tolist(), "adc_range": l.adc_range.tolist()}
            for name, l in layers}


def calibrate_from_loader(model: nn.Module, loader, device, images: int = 8) -> int:
    """Rules 20, 21 and 26 for the scripts: calibrate (and, where a layer asks, measure the
    output gains) on the first ``images`` readable images of ``loader`` (batches of ``(images,
    labels, ...)`` or :class:`~crossbar_torch.apps.data.Batch`). Returns the number of images
    used."""
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
        raise UserInputError("calibrate: no readable image to calibrate the analog ranges on")
    x = torch.cat(got).to(device)
    calibrate(model, x)
    if needs_gains(model):  # rule 26: the logits' gains, on the same images
        calibrate_gains(model, run=lambda m: m(x))
    return n


