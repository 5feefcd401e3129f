"""The crossbar layers and the conversion of a float model into them.

``modules``: the layers (``CrossbarLinear``, ``CrossbarConv2d``); ``analog``: the analog
periphery a layer computes through (DAC/ADC, rule 15) and ``calibrate``; ``conversion``:
``convert`` swaps a model's Linear / Conv2d layers for crossbar layers.
"""
from .modules import CrossbarConv2d, CrossbarLinear, crossbar_layers  # noqa: F401
from .conversion import ConversionRecord, convert  # noqa: F401
from .analog import calibrate  # noqa: F401
