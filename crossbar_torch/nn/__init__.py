"""The crossbar layers and the conversion of a float model into them.

``modules``: the layers (``base`` what they share, ``linear``, ``conv``); ``analog``: the
analog periphery a layer computes through (DAC, ADC, conductances, rules 17 to 20);
``calibration``: ``calibrate`` (rule 20's ranges, rule 21's input moments); ``gains``:
``calibrate_gains`` (rule 26's output gains, on the float model); ``conversion``: ``convert``
swaps a model's Linear / Conv2d layers for crossbar layers. Imports go one way: conversion,
calibration and gains -> modules -> analog.
"""
from .modules import CrossbarConv2d, CrossbarLinear, crossbar_layers  # noqa: F401
from .conversion import ConversionRecord, convert  # noqa: F401
from .calibration import calibrate  # noqa: F401
from .gains import calibrate_gains  # noqa: F401
