#!/usr/bin/env python
"""``python scripts/allocate.py ...``: the command ``crossbar-allocate`` (installed with the package).

Its code is crossbar_torch/apps/cli_allocate.py; this file only runs it.
"""
from crossbar_torch.apps import cli_allocate as _impl

globals().update({k: v for k, v in vars(_impl).items() if not k.startswith("__")})

if __name__ == "__main__":
    _impl.entry_point()
