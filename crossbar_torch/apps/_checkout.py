"""Files of the source checkout that some commands take as defaults (``configs/*.yaml``).

An installed package has no checkout around it: there these return ``None`` and the command
asks for the flag instead (one ``error:`` line)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def checkout_root() -> Optional[Path]:
    """The repository this package runs from (editable install or ``scripts/``), else None."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "configs").is_dir() else None


def checkout_file(*parts: str) -> Optional[str]:
    """``<checkout>/<parts>`` when the package runs from a checkout holding that file."""
    root = checkout_root()
    path = root.joinpath(*parts) if root is not None else None
    return str(path) if path is not None and path.is_file() else None


def sample_dev() -> Optional[str]:
    """The 100-image ImageNet sample that this project's machines keep beside the checkout (its
    tests use it), for hints only; None elsewhere."""
    root = checkout_root()
    path = root.parent / "shared" / "data" / "imagenet-sample-dev" if root is not None else None
    return str(path) if path is not None and path.is_dir() else None
