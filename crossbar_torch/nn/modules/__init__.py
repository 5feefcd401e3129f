"""The crossbar layers: ``base`` (what they share), ``state`` (state-dict checks on load),
``linear``, ``conv``."""
import torch.nn as nn

from .base import ANALOG_BUFFERS, CROSSBAR_BUFFERS, CrossbarMixin  # noqa: F401
from .conv import CrossbarConv2d
from .linear import CrossbarLinear

CROSSBAR_LAYERS = (CrossbarLinear, CrossbarConv2d)


def crossbar_layers(model: nn.Module):
    """(name, layer) of every crossbar layer, in module order (the schedule order, rule 6)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, CROSSBAR_LAYERS)]
