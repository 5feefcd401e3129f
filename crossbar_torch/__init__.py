"""crossbar_torch: bit-sliced memristive crossbars inside PyTorch models.

Implements sorted weight sectioning and bit stucking (Farias & Kung, arXiv 2410.21730):
``convert`` swaps Linear / Conv2d layers for crossbar layers, ``reprogram_report`` counts
memristor writes against an unsorted baseline. The normative semantics: docs/semantics.md.
"""
from .config import CrossbarConfig, load_config  # noqa: F401
from .errors import (ConfigError, CrossbarError, DeviceError, MissingDependencyError,  # noqa: F401
                     UsageError, UserInputError)
from .nn import (ConversionRecord, CrossbarConv2d, CrossbarLinear, calibrate,  # noqa: F401
                 calibrate_gains, convert, crossbar_layers)
from .programming import CrossbarPool, ProgramResult, program_model, reprogram, stuck_mask  # noqa: F401
from .report import ReprogramReport, reprogram_report  # noqa: F401

__version__ = "0.1.0"
