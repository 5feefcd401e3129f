"""Memristor device presets, and the pure functions that turn write counts into energy and time.

The counting rules (docs/semantics.md rule 8) say *how many* SET and RESET pulses a pass costs and how
many crossbar rows it programs; this module says what those counts cost on a given memory
technology: write energy, programming time, and how many passes a cell survives before it
reaches its endurance. The semantics are in docs/semantics.md, "Endurance and cost".

A :class:`Device` is a frozen, validated bundle of per-cell numbers (endurance, energy and width
of one SET and one RESET pulse, energy of one analog read of a tile) plus one architectural
number (how many crossbars of the pool can be written at once). Presets are package data,
``crossbar_torch/presets/devices/*.yaml`` (read through :mod:`importlib.resources`, so they come
with an installed wheel); every number there cites its source on its own line.

Everything here is a pure function of its arguments: no torch, no global state beyond a cache of
parsed YAML files keyed on (resolved path, mtime, size), so an edited file is read again.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import asdict, dataclass
from fractions import Fraction
from numbers import Integral, Rational, Real
from importlib import resources
from pathlib import Path

from .errors import DeviceError

# The presets ship inside the package (package data in pyproject.toml), not beside it in the
# repository: a wheel or a plain ``pip install .`` has no checkout around it.
DEVICE_DIR = Path(str(resources.files("crossbar_torch") / "presets" / "devices"))

# The per-cell numbers: each a real, finite, strictly positive float.
FLOAT_FIELDS = ("endurance", "set_energy_j", "reset_energy_j", "set_pulse_s", "reset_pulse_s",
                "read_energy_j")
# The keys a device YAML must hold, exactly (``source`` is where it was loaded from, not a key).
YAML_KEYS = ("name", "description", *FLOAT_FIELDS, "write_parallel_crossbars")
MAX_BITS_PER_CELL = 8  # as CrossbarConfig.bits_per_cell


def _invalid(name, field, value, what="must be a positive finite number") -> DeviceError:
    return DeviceError(f"device {name!r}: {field}={value!r} is invalid: {what}")


@dataclass(frozen=True)
class Device:
    """One memory technology, as far as write cost and endurance go.

    - ``endurance``: write cycles one cell survives.
    - ``set_energy_j`` / ``reset_energy_j``: energy of one SET / RESET pulse (one level step).
    - ``set_pulse_s`` / ``reset_pulse_s``: width of one SET / RESET pulse.
    - ``read_energy_j``: energy of one analog matrix-vector product on one crossbar tile (one
      input vector on all rows, all columns read).
    - ``write_parallel_crossbars``: crossbars of the pool that can be programmed at the same time
      (1: one set of write drivers shared by the pool).
    - ``source``: the YAML file it was loaded from, ``""`` when built in code.
    """

    name: str
    description: str
    endurance: float
    set_energy_j: float
    reset_energy_j: float
    set_pulse_s: float
    reset_pulse_s: float
    read_energy_j: float
    write_parallel_crossbars: int
    source: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise _invalid(self.name, "name", self.name, "must be a non-empty string")
        if not isinstance(self.description, str):
            raise _invalid(self.name, "description", self.description, "must be a string")
        if not isinstance(self.source, str):
            raise _invalid(self.name, "source", self.source, "must be a string")
        for field in FLOAT_FIELDS:
            value = getattr(self, field)
            # bool is an int in Python: `endurance: true` in a YAML must not read as 1 cycle.
            if (isinstance(value, bool) or not isinstance(value, Real)
                    or not math.isfinite(value) or value <= 0):
                raise _invalid(self.name, field, value)
            object.__setattr__(self, field, float(value))
        w = self.write_parallel_crossbars
        if isinstance(w, bool) or not isinstance(w, Integral) or w < 1:
            raise _invalid(self.name, "write_parallel_crossbars", w, "must be an integer >= 1")
        object.__setattr__(self, "write_parallel_crossbars", int(w))

    def to_dict(self) -> dict:
        """Plain JSON-able fields (``source`` included), in declaration order."""
        return asdict(self)


# --------------------------------------------------------------------------- loading


def known_devices() -> list[str]:
    """Names of the presets: the sorted stems of ``crossbar_torch/presets/devices/*.yaml``."""
    return sorted(p.stem for p in DEVICE_DIR.glob("*.yaml"))


def _is_path(name_or_path: str) -> bool:
    return ("/" in name_or_path or os.sep in name_or_path
            or name_or_path.endswith((".yaml", ".yml")))


def load_device(name_or_path) -> Device:
    """A preset by name (``"rram"``), or the device YAML at a path (anything containing ``/`` or
    ending in ``.yaml`` / ``.yml``); a :class:`Device` is returned as it is.

    Every mistake is a :class:`~crossbar_torch.errors.DeviceError` (a ValueError) naming the file
    and the key, so that scripts answer it with one ``error:`` line. Parsed files are cached on
    (resolved path, mtime, size): an edited file is read again.
    """
    if isinstance(name_or_path, Device):
        return name_or_path  # values already (a config built from a checkpoint's device)
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise DeviceError(f"device {name_or_path!r} is invalid: give a preset name "
                          f"({', '.join(known_devices())}) or a path to a device YAML")
    if _is_path(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise DeviceError(f"device file not found: {name_or_path}")
        if not path.is_file():
            raise DeviceError(f"device file {name_or_path} is not a file")
    else:
        known = known_devices()
        if name_or_path not in known:
            raise DeviceError(f"unknown device {name_or_path!r}; known: {', '.join(known)} "
                              "(or a path to a device YAML)")
        path = DEVICE_DIR / f"{name_or_path}.yaml"
    resolved = path.resolve()
    st = resolved.stat()
    return _load_file(str(resolved), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _load_file(path: str, mtime_ns: int, size: int) -> Device:
    """Parse and validate one device YAML. ``mtime_ns`` and ``size`` only key the cache."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise DeviceError(f"{where}: YAML syntax error: {problem}") from None
    except UnicodeDecodeError as e:
        raise DeviceError(f"{path}: not a text (YAML) file: {e.reason}") from None
    if not isinstance(data, dict):
        raise DeviceError(f"{path}: a device YAML must be a mapping with the keys "
                          f"{', '.join(YAML_KEYS)}; got {type(data).__name__}")
    unknown = [str(k) for k in data if k not in YAML_KEYS]
    if unknown:
        raise DeviceError(f"{path}: unknown key(s) {', '.join(unknown)}; "
                          f"the keys are {', '.join(YAML_KEYS)}")
    missing = [k for k in YAML_KEYS if k not in data]
    if missing:
        raise DeviceError(f"{path}: missing key(s) {', '.join(missing)}")
    stem = Path(path).stem
    if data["name"] != stem:
        raise DeviceError(f"{path}: name={data['name']!r} must equal the file name {stem!r}")
    values = dict(data)
    for key in FLOAT_FIELDS:
        v = values[key]
        # YAML 1.1 (PyYAML) reads "1e6" or "1.0e6" as a string: take numbers written so as such.
        if isinstance(v, str):
            try:
                values[key] = float(v)
            except ValueError:
                pass
    try:
        return Device(**values, source=path)
    except ValueError as e:  # Device.__post_init__ raises a DeviceError
        raise DeviceError(f"{path}: {e}") from None


# --------------------------------------------------------------------------- cost


def _count(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: must be an integer >= {minimum}")
    return int(value)


def _amount(name: str, value) -> float:
    """A count per pass: an integer, or the average of a wear-levelling period (a float)."""
    if (isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value)
            or value < 0):
        raise ValueError(f"{name}={value!r} is invalid: must be a finite number >= 0")
    return value


def write_cost(set_pulses: float, reset_pulses: float, rows_programmed: float, pool: int,
               bits_per_cell: int, device: Device) -> dict:
    """Energy and time of programming one pass, from its counts (docs/semantics.md rule 16).
    Counts may be a wear-levelling period's averages per pass (floats, rule 14).

    - Energy: every SET pulse costs ``device.set_energy_j`` and every RESET pulse
      ``device.reset_energy_j`` (the counts are pulses: one per level step, so a multi-level
      cell moving 3 levels costs 3 pulses).
    - Time: a 1T1R crossbar is written one row at a time; a row's SET pulses go in parallel over
      its columns, then its RESET pulses. A multi-level cell may need up to ``2**b - 1``
      one-level steps, and the row waits for its slowest cell, so a row's slot is the worst case
      ``(2**b - 1) * (set_pulse_s + reset_pulse_s)``. Tiles are dealt round-robin to the pool's
      crossbars, so the programmed rows spread evenly over the ``min(write_parallel_crossbars,
      pool)`` crossbars written at once: ``write_time_s = rows * row_slot / parallel``.

    Returns ``set_energy_j``, ``reset_energy_j``, ``write_energy_j``, ``row_write_time_s``,
    ``write_time_s`` (floats) and ``parallel_crossbars`` (an int, a count).
    """
    set_pulses = _amount("set_pulses", set_pulses)
    reset_pulses = _amount("reset_pulses", reset_pulses)
    rows_programmed = _amount("rows_programmed", rows_programmed)
    pool = _count("pool", pool, 1)
    bits_per_cell = _count("bits_per_cell", bits_per_cell, 1)
    if bits_per_cell > MAX_BITS_PER_CELL:
        raise ValueError(f"bits_per_cell={bits_per_cell!r} is invalid: must be an integer "
                         f"with 1 <= bits_per_cell <= {MAX_BITS_PER_CELL}")
    if not isinstance(device, Device):
        raise TypeError(f"device must be a Device, not {type(device).__name__}")
    set_energy = set_pulses * device.set_energy_j
    reset_energy = reset_pulses * device.reset_energy_j
    row_time = ((1 << bits_per_cell) - 1) * (device.set_pulse_s + device.reset_pulse_s)
    parallel = min(device.write_parallel_crossbars, pool)
    return {
        "set_energy_j": float(set_energy),
        "reset_energy_j": float(reset_energy),
        "write_energy_j": float(set_energy + reset_energy),
        "row_write_time_s": float(row_time),
        "parallel_crossbars": int(parallel),
        "write_time_s": float(rows_programmed * row_time / parallel),
    }


def passes_until(endurance: float, writes_per_pass: float) -> int | None:
    """The pass in which a cell reaches its endurance: ``ceil(endurance / writes_per_pass)``.

    A cell that takes ``writes_per_pass`` writes every pass has taken ``n * writes_per_pass``
    after ``n`` passes; the first ``n`` at which that reaches ``endurance`` is the pass during
    which it wears out (1-based; it survives ``n - 1`` whole passes). ``None`` when the cell takes
    no writes: it never wears. Use the most-written cell (``max_cell_writes_per_pass``) for the
    lifetime of the array.

    Computed on the exact rationals of the two numbers: a float quotient can round a value just
    above an integer down onto it, which would report the wear-out one pass early.
    """
    for name, value in (("endurance", endurance), ("writes_per_pass", writes_per_pass)):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ValueError(f"{name}={value!r} is invalid: must be a finite number")
    if endurance <= 0:
        raise ValueError(f"endurance={endurance!r} is invalid: must be > 0")
    if writes_per_pass < 0:
        raise ValueError(f"writes_per_pass={writes_per_pass!r} is invalid: must be >= 0")
    if writes_per_pass == 0:
        return None
    return math.ceil(_exact(endurance) / _exact(writes_per_pass))


def _exact(value) -> Fraction:
    """The exact rational of an int, Fraction or float (numpy scalars included)."""
    if isinstance(value, Integral):
        return Fraction(int(value))
    return Fraction(value) if isinstance(value, Rational) else Fraction(float(value))
