#!/usr/bin/env python
"""``python scripts/plot_periphery.py ...``: the command ``crossbar-plot-periphery`` (installed with the package).

Its code is crossbar_torch/apps/cli_plot_periphery.py; this file only runs it, and exposes its names
(``main`` and the helpers) to the tests that load it by path.
"""
from crossbar_torch.apps import cli_plot_periphery as _impl

globals().update({k: v for k, v in vars(_impl).items() if not k.startswith("__")})

if __name__ == "__main__":
    _impl.entry_point()
