"""The frontier tool's user error (its own module: every other module of the package raises it)."""
from __future__ import annotations

from ...errors import UserInputError


class FrontierError(UserInputError):
    """Bad input (sweep file, previous CSV, output path): one line naming what is wrong."""
