"""crossbar_torch: bit-sliced memristive crossbars inside PyTorch models."""
from .config import CrossbarConfig, load_config  # noqa: F401

__version__ = "0.1.0"
