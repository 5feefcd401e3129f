"""CrossbarConfig: the one description of a crossbar hardware configuration.

A frozen dataclass, validated on construction, loadable from / savable to YAML and overridable
with ``key=value`` strings (the ``--set`` flag of every script).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
import os
import tempfile
from dataclasses import dataclass, fields
from typing import Any, Iterable, Mapping

from . import encoding as _encoding
from .encoding import ENCODINGS
from .errors import ConfigError

SORT_KEYS = ("none", "magnitude", "value")
SORT_SCOPES = ("filter",)
# Rule 13 enumerates the free low cells of a weight: bound the search (2**20 assignments at most,
# reached only by configurations far past the paper's: 8-bit weights never exceed 2**16).
MAX_COMPENSATION_BITS = 21
QUANT_MODES = ("per_channel", "per_tensor")
STUCK_VALUES = ("initial", 0, 1)
FILTER_ORDERS = ("natural", "profile", "chain")  # chain: this project's, beyond rule 11
SCHEDULES = ("section_major", "greedy")
FEEDBACK_MODES = ("none", "hessian")  # rule 21: output-aware (error-feedback) programming
# Rule 25: the unit a filter's error is weighed in against its writes (rules 23 and 24): its
# own LSB, or the layer's output units (its scale squared, over the layer's median filter's).
FILTER_WEIGHTS = ("lsb", "scale", "gain")  # rules 25 and 26
# Rule 22: the fields a layer_overrides entry may set for the layers whose names it matches.
OVERRIDE_FIELDS = ("stuck_slices", "reprogram_fraction", "compensate", "feedback",
                   "feedback_damp", "write_penalty", "feedback_sweeps", "filter_weight")
WEAR_LEVELING = ("none", "rotate_rows", "rotate")
ADC_RANGES = ("full", "calibrated")
ADC_SCOPES = ("slice", "weight")
# Fields that change neither the layers' cells nor their effective weights, only how the
# programming is counted and costed: a model converted with one value may be counted with another.
COUNTING_FIELDS = ("wear_leveling", "device", "tuned_on", "warn_output_error")
# Rules 17 to 19: how the crossbar computes, not what it holds or what programming it costs.
ANALOG_FIELDS = ("input_bits", "input_bits_per_cycle", "input_range", "adc_bits", "adc_range",
                 "adc_scope", "g_ratio", "prog_noise", "read_noise", "drift_nu", "drift_nu_std",
                 "t_inference")
# Fields whose ideal value is None: the strings none / None / null / ~ mean None too (YAML reads
# only ~ and null as None; "--set input_bits=None" is what a Python user types).
NULLABLE_FIELDS = ("input_bits", "input_range", "adc_bits", "g_ratio")
NULL_SPELLINGS = ("none", "null", "~")
# Rule 14: a wear-levelling period longer than this many passes is announced (counting runs
# every pass of it), once per (wear_leveling, rows, cols) in a process.
WEAR_PERIOD_WARN = 1024
_WARNED_PERIODS: set = set()


@dataclass(frozen=True)
class CrossbarConfig:
    """Hardware and mapping parameters (docs/semantics.md)."""

    rows: int = 128
    cols: int = 128
    weight_bits: int = 8
    bits_per_cell: int = 1
    encoding: str = "differential"
    quant: str = "per_channel"
    sort: str = "magnitude"
    sort_scope: str = "filter"
    stuck_slices: int = 0
    reprogram_fraction: float = 1.0
    stuck_value: Any = "initial"
    pool: int = 1
    seed: int = 0
    # Rules 11 to 13 (docs/semantics.md): the defaults keep rules 1 to 10 unchanged.
    filter_order: str = "natural"
    schedule: str = "section_major"
    schedule_window: int = 256
    compensate: bool = False
    # Rule 21 (docs/semantics.md): output-aware programming, once calibrated (xb.calibrate, then
    # xb.reprogram): each filter's weights are chosen in input order among the values their
    # held cells allow, the residual carried onto the rest through E[x x^T] (GPTQ / OBQ).
    feedback: str = "none"          # "none" or "hessian"
    feedback_damp: float = 0.01     # damping added to E[x x^T]: a fraction of its mean diagonal
    # Rule 23: write-aware feedback. Each weight's choice also pays this many LSB^2 per cell it
    # would write over what the filter placed before it on the same crossbar chose (0: off).
    write_penalty: float = 0.0
    # Rule 24: refinement sweeps. After rule 21 / 23, go over every weight this many times more
    # and move it by up to 3 LSB when that lowers the layer's output error plus write_penalty
    # per cell written (coordinate descent; needs feedback and nothing stuck; 0: off).
    feedback_sweeps: int = 0
    # Rule 25: "scale" weighs each filter's error by its scale squared over the layer's median
    # filter's when rules 23 and 24 trade it against writes, so that a write is saved where it
    # costs the layer's output least ("lsb": every filter's LSB alike, rules 23 and 24 as such).
    filter_weight: str = "lsb"
    # Rule 22: per-layer policies, {glob pattern on module names: {field: value}} for the
    # fields of OVERRIDE_FIELDS; every matching entry applies, later ones over earlier ones.
    layer_overrides: Any = ()
    # Warnings only (they change no cell): the model classes a preset was tuned on (convert
    # warns on another), and the relative output error on calibration data above which a
    # layer is named (checked when its input moments are known; 0: never).
    tuned_on: str = ""
    warn_output_error: float = 0.02
    # Endurance and cost (docs/semantics.md rules 14 to 16): wear levelling of the mapping, and
    # the memristor device (a preset in crossbar_torch/presets/devices/ or a path to a device
    # YAML).
    wear_leveling: str = "none"
    device: str = "default"
    # Analog periphery (docs/semantics.md rules 17 to 20): every default is ideal.
    input_bits: Any = None          # DAC bits (None: ideal inputs)
    input_bits_per_cycle: int = 1   # bits driven per cycle (bit-serial: 1)
    input_range: Any = None         # DAC full scale (None: calibrated per layer)
    adc_bits: Any = None            # ADC bits per column partial sum (None: ideal)
    adc_range: str = "full"         # "full" (largest possible sum) or "calibrated"
    adc_scope: str = "slice"        # "slice" (bit-sliced columns) or "weight" (whole weights)
    g_ratio: Any = None             # G_max / G_min (None or inf: G_min = 0)
    prog_noise: float = 0.0         # relative std of a written cell's conductance
    read_noise: float = 0.0         # relative std drawn at each forward
    drift_nu: float = 0.0           # mean drift exponent
    drift_nu_std: float = 0.0       # its spread over cells
    t_inference: float = 1.0        # seconds since programming (t0 = 1 s)

    def __post_init__(self):
        def bad(name, allowed):
            raise ConfigError(
                f"CrossbarConfig.{name}={getattr(self, name)!r} is invalid: allowed {allowed}")

        for name in NULLABLE_FIELDS:
            v = getattr(self, name)
            if isinstance(v, str) and v.strip().lower() in NULL_SPELLINGS:
                object.__setattr__(self, name, None)
        for name in ("rows", "cols", "weight_bits", "bits_per_cell", "stuck_slices", "pool", "seed",
                     "schedule_window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                bad(name, "an integer")
        if self.rows < 1 or self.rows > 1 << 20:
            bad("rows", "1 <= rows <= 2**20")
        if self.cols < 1 or self.cols > 1 << 20:
            bad("cols", "1 <= cols <= 2**20")
        if not 2 <= self.weight_bits <= 16:
            bad("weight_bits", "2 <= weight_bits <= 16")
        if not 1 <= self.bits_per_cell <= 8:
            bad("bits_per_cell", "1 <= bits_per_cell <= 8")
        if self.encoding not in ENCODINGS:
            bad("encoding", f"one of {ENCODINGS}")
        if self.bits_per_cell > self.magnitude_bits:
            bad("bits_per_cell", f"at most the {self.magnitude_bits} bits a {self.encoding} "
                "weight stores (a wider cell would hold one partial slice)")
        if self.quant not in QUANT_MODES:
            bad("quant", f"one of {QUANT_MODES}")
        if self.sort not in SORT_KEYS:
            bad("sort", f"one of {SORT_KEYS}")
        if self.sort_scope not in SORT_SCOPES:
            bad("sort_scope", f"one of {SORT_SCOPES}")
        if not 0 <= self.stuck_slices <= self.slices:
            bad("stuck_slices", f"0 <= stuck_slices <= {self.slices} (the slices of one weight)")
        rf = self.reprogram_fraction
        if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not (0.0 <= rf <= 1.0):
            bad("reprogram_fraction", "a number in [0, 1]")
        object.__setattr__(self, "reprogram_fraction", float(rf))
        sv = self.stuck_value
        if isinstance(sv, str) and sv in ("0", "1"):
            sv = int(sv)
            object.__setattr__(self, "stuck_value", sv)
        if isinstance(sv, bool) or sv not in STUCK_VALUES:
            bad("stuck_value", "'initial', 0 or 1")
        if self.pool < 1:
            bad("pool", "pool >= 1")
        if not 0 <= self.seed < 2 ** 63:
            bad("seed", "0 <= seed < 2**63")
        if self.filter_order not in FILTER_ORDERS:
            bad("filter_order", f"one of {FILTER_ORDERS}")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"one of {SCHEDULES}")
        if not 1 <= self.schedule_window <= 1 << 30:
            bad("schedule_window", "1 <= schedule_window <= 2**30 (tiles the greedy schedule "
                "looks ahead)")
        if not isinstance(self.compensate, bool):
            bad("compensate", "true or false")
        if self.compensate and self.compensation_bits > MAX_COMPENSATION_BITS:
            bad("compensate", f"at most {MAX_COMPENSATION_BITS} bits of low cells per weight to "
                f"search (bits_per_cell x cells in the stuck slices = {self.compensation_bits}); "
                "lower stuck_slices")
        if self.feedback not in FEEDBACK_MODES:
            bad("feedback", f"one of {FEEDBACK_MODES}")
        fd = self.feedback_damp
        if isinstance(fd, str):
            try:
                fd = float(fd)
            except ValueError:
                bad("feedback_damp", "a number in (0, 10]")
        if isinstance(fd, bool) or not isinstance(fd, (int, float)) or not 0.0 < fd <= 10.0:
            bad("feedback_damp", "a number in (0, 10]")
        object.__setattr__(self, "feedback_damp", float(fd))
        wp = self.write_penalty
        if isinstance(wp, str):
            try:
                wp = float(wp)
            except ValueError:
                bad("write_penalty", "a number in [0, 1e6] (LSB^2 per cell write)")
        if (isinstance(wp, bool) or not isinstance(wp, (int, float)) or not math.isfinite(wp)
                or not 0.0 <= wp <= 1e6):
            bad("write_penalty", "a number in [0, 1e6] (LSB^2 per cell write)")
        object.__setattr__(self, "write_penalty", float(wp))
        if self.write_penalty > 0 and self.feedback == "none":
            bad("write_penalty", "0 unless feedback is 'hessian' (rule 23 is a choice inside "
                "rule 21's error feedback)")
        fs = self.feedback_sweeps
        if isinstance(fs, str) and fs.strip().lstrip("-").isdigit():
            fs = int(fs)
        if isinstance(fs, bool) or not isinstance(fs, int) or not 0 <= fs <= 100:
            bad("feedback_sweeps", "an integer in [0, 100] (rule 24's refinement sweeps)")
        object.__setattr__(self, "feedback_sweeps", fs)
        if fs > 0 and self.feedback == "none":
            bad("feedback_sweeps", "0 unless feedback is 'hessian' (rule 24 refines rule 21's "
                "choices)")
        if self.filter_weight not in FILTER_WEIGHTS:
            bad("filter_weight", f"one of {', '.join(FILTER_WEIGHTS)} (rules 25, 26)")
        if self.filter_weight != "lsb" and self.feedback == "none":
            bad("filter_weight", "'lsb' unless feedback is 'hessian' (rules 25 and 26 weigh rule "
                "23's and rule 24's errors)")
        if fs > 0 and self.stucking:
            bad("feedback_sweeps", "0 with bit stucking (rule 24 moves weights whose cells are "
                "all free: set stuck_slices=0 or reprogram_fraction=1 for these layers, or "
                "feedback_sweeps=0)")
        if self.feedback != "none" and self.stucking and not self.compensate:
            raise ConfigError(
                f"CrossbarConfig.feedback={self.feedback!r} is invalid with compensate=False and "
                "bit stucking: the free cells of a weight with stuck cells are set by rule 13 to "
                "reach the value error feedback chose; set compensate=true "
                "(docs/semantics.md rule 21)")
        self._check_layer_overrides()
        if not isinstance(self.tuned_on, str):
            bad("tuned_on", "a string (model class names, comma-separated)")
        we = self.warn_output_error
        if isinstance(we, bool) or not isinstance(we, (int, float)) or not 0.0 <= we <= 1e6:
            bad("warn_output_error", "a number >= 0 (0: no warning)")
        object.__setattr__(self, "warn_output_error", float(we))
        if self.wear_leveling not in WEAR_LEVELING:
            bad("wear_leveling", f"one of {WEAR_LEVELING}")
        if self.wear_leveling != "none" and self.stucking_anywhere:
            raise ConfigError(
                f"CrossbarConfig.wear_leveling={self.wear_leveling!r} is invalid with bit stucking "
                f"(stuck_slices={self.stuck_slices}, reprogram_fraction="
                f"{self.reprogram_fraction}): a stuck cell keeps its level where it is, so a "
                "shifted mapping would compute with another weight's bit in it; use "
                "wear_leveling='none' with stucking (docs/semantics.md rule 14)")
        self._check_device(bad)
        self._check_analog(bad)
        if self.cols < self.cells_per_weight:
            raise ConfigError(
                f"CrossbarConfig.cols={self.cols} is invalid: one weight takes "
                f"{self.cells_per_weight} cells ({self.encoding}, weight_bits={self.weight_bits}, "
                f"bits_per_cell={self.bits_per_cell}), so cols must be >= {self.cells_per_weight}")
        self._warn_long_wear_period()

    def _warn_long_wear_period(self) -> None:
        """Rule 14 counts every pass of a wear-levelling period: say so (once per process and
        geometry) when the period is long enough to make counting slow."""
        period = self.wear_period
        key = (self.wear_leveling, self.rows, self.cols)
        if period <= WEAR_PERIOD_WARN or key in _WARNED_PERIODS:
            return
        _WARNED_PERIODS.add(key)
        how = (f"lcm(rows={self.rows}, cols={self.cols}) = {period:,}"
               if self.wear_leveling == "rotate" else f"rows = {period:,}")
        import warnings
        warnings.warn(
            f"wear_leveling={self.wear_leveling!r}: the mapping repeats after {period:,} passes "
            f"({how}), and counting programs every one of them (about {period:,} times the "
            "work of one pass)"
            + ("; rows and cols with a large common divisor (e.g. cols a multiple of rows) "
               "give a short period" if self.wear_leveling == "rotate" else ""),
            UserWarning, stacklevel=4)

    def _check_layer_overrides(self) -> None:
        """Rule 22: normalize ``layer_overrides`` to ((pattern, ((field, value), ...)), ...) and
        check every entry: known fields, and a valid config for the layers it matches."""
        raw = self.layer_overrides
        if raw is None:
            raw = ()
        items = list(raw.items()) if isinstance(raw, Mapping) else list(raw)
        norm = []
        for item in items:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise ConfigError(f"CrossbarConfig.layer_overrides: {item!r} is not a "
                                  "'pattern: {field: value}' entry")
            pattern, changes = item
            if not isinstance(pattern, str) or not pattern:
                raise ConfigError(f"CrossbarConfig.layer_overrides: pattern {pattern!r} must be "
                                  "a non-empty glob pattern on module names")
            changes = dict(changes.items() if isinstance(changes, Mapping) else changes)
            if not changes:
                raise ConfigError(f"CrossbarConfig.layer_overrides[{pattern!r}] sets no field")
            unknown = sorted(str(k) for k in changes if k not in OVERRIDE_FIELDS)
            if unknown:
                raise ConfigError(f"CrossbarConfig.layer_overrides[{pattern!r}]: field(s) "
                                  f"{unknown} cannot be set per layer; allowed: "
                                  f"{list(OVERRIDE_FIELDS)}")
            norm.append((pattern, tuple((k, changes[k]) for k in OVERRIDE_FIELDS
                                        if k in changes)))
        object.__setattr__(self, "layer_overrides", tuple(norm))
        if not norm:
            return
        for pattern, changes in norm:
            try:
                one = self.replace(layer_overrides=(), **dict(changes))
            except ValueError as e:
                raise ConfigError(f"CrossbarConfig.layer_overrides[{pattern!r}]: {e}") from None
            # the overridden values, normalized by that config (e.g. "0.5" -> 0.5)
            norm[norm.index((pattern, changes))] = (pattern, tuple(
                (k, getattr(one, k)) for k, _ in changes))
            if (one.stucking or self.stucking) and (one.stucking != self.stucking or (
                    one.stuck_slices, one.reprogram_fraction) != (
                    self.stuck_slices, self.reprogram_fraction)):
                if self.stuck_value != "initial":
                    raise ConfigError(
                        f"CrossbarConfig.layer_overrides[{pattern!r}]: per-layer stucking needs "
                        f"stuck_value='initial' (got {self.stuck_value!r}): a cell stuck at "
                        "0 or 1 is a fault of the cell, the same for every layer")
        object.__setattr__(self, "layer_overrides", tuple(norm))

    def for_layer(self, name: str) -> "CrossbarConfig":
        """Rule 22: this config with the ``layer_overrides`` entries matching module ``name``
        applied (in order), and no overrides of its own."""
        if not self.layer_overrides:  # (also keeps torch.compile out of the lru_cache)
            return self
        return _config_for_layer(self, name)

    def values_anywhere(self, field: str) -> set:
        """The values ``field`` takes in this config and in its rule-22 overrides: what some
        layer may be programmed with."""
        return {getattr(self, field)} | {dict(ch)[field] for _, ch in self.layer_overrides
                                         if field in dict(ch)}

    @property
    def stucking_anywhere(self) -> bool:
        """Some layer can have stuck cells (this config's or an override's stucking)."""
        return self.stucking or any(
            self.replace(layer_overrides=(), **dict(ch)).stucking
            for _, ch in self.layer_overrides)

    def _check_analog(self, bad) -> None:
        """Rules 17 to 19: each field in range, named when it is not."""
        def number(name, lo, hi=math.inf, lo_open=False, allow_inf=False):
            v = getattr(self, name)
            if isinstance(v, str):  # YAML 1.1 reads 1e-2 / inf as strings
                try:
                    v = float(v)
                except ValueError:
                    bad(name, "a number")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                bad(name, "a number")
            if math.isinf(v) and not allow_inf:
                bad(name, "a finite number")
            if (v <= lo if lo_open else v < lo) or v > hi:
                bad(name, f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}"
                                                                  if hi != math.inf else ""))
            object.__setattr__(self, name, float(v))

        for name, hi in (("input_bits", 16), ("adc_bits", 24)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)
                                  or not 1 <= v <= hi):
                bad(name, f"None (ideal) or an integer 1 .. {hi}")
        v = self.input_bits_per_cycle
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 16:
            bad("input_bits_per_cycle", "an integer 1 .. 16")
        if self.input_bits is not None and v > self.input_bits:
            bad("input_bits_per_cycle", f"at most input_bits={self.input_bits}")
        if self.input_range is not None:
            number("input_range", 0.0, lo_open=True)
        if self.adc_range not in ADC_RANGES:
            bad("adc_range", f"one of {ADC_RANGES}")
        if self.adc_scope not in ADC_SCOPES:
            bad("adc_scope", f"one of {ADC_SCOPES}")
        if self.g_ratio is not None:
            number("g_ratio", 1.0, lo_open=True, allow_inf=True)
            if math.isinf(self.g_ratio):  # stored as None: JSON has no infinity
                object.__setattr__(self, "g_ratio", None)
        number("prog_noise", 0.0, 10.0)
        number("read_noise", 0.0, 10.0)
        number("drift_nu", 0.0, 10.0)
        number("drift_nu_std", 0.0, 10.0)
        number("t_inference", 1.0, 1e12)
        if self.adc_scope == "weight":
            if self.input_bits is None:
                bad("adc_scope", "'slice' unless input_bits is set ('weight' quantizes the "
                    "signed inputs in one cycle)")
            if self.noisy or self.g_ratio is not None:
                bad("adc_scope", "'slice' with noise or a finite g_ratio ('weight' holds "
                    "ideal whole weights)")
        if self.analog and self.encoding == "twos_complement" and (
                self.weight_bits - 1) % self.bits_per_cell:
            bad("encoding", "differential or offset with the analog periphery, unless the top "
                "two's-complement slice holds only the sign bit (weight_bits - 1 a multiple "
                "of bits_per_cell): its other bits would not add linearly (rule 18)")
        if self.noisy and self.wear_leveling != "none":
            bad("wear_leveling", "'none' with programming noise, read noise or drift (their "
                "draws are keyed by physical cells, which rule 14 moves)")

    @property
    def noisy(self) -> bool:
        """Rule 19: some conductance differs from its level (noise or drift)."""
        return bool(self.prog_noise or self.read_noise
                    or (self.drift_nu or self.drift_nu_std) and self.t_inference > 1.0)

    @property
    def analog(self) -> bool:
        """Rules 17 to 19: the crossbar is not ideal, so layers do not use the cached GEMM."""
        return (self.input_bits is not None or self.adc_bits is not None or self.noisy
                or self.g_ratio is not None)

    @property
    def g0(self) -> float:
        """Rule 19: the conductance of level 0 in level units, (2**b - 1) / (g_ratio - 1)."""
        return 0.0 if self.g_ratio is None else (2 ** self.bits_per_cell - 1) / (self.g_ratio - 1)

    # Derived quantities (docs/semantics.md rules 3 and 5).
    @property
    def magnitude_bits(self) -> int:
        """Bits stored per array: B-1 magnitude bits (differential) or the B-bit word."""
        return _encoding.magnitude_bits(self.weight_bits, self.encoding)

    @property
    def slices(self) -> int:
        """S: slices per array (per weight for single-array encodings)."""
        return _encoding.slices_for(self.weight_bits, self.bits_per_cell, self.encoding)

    @property
    def arrays(self) -> int:
        return _encoding.arrays_for(self.encoding)

    @property
    def cells_per_weight(self) -> int:
        """c: cells one weight occupies (2S for differential, S otherwise)."""
        return _encoding.cells_for(self.weight_bits, self.bits_per_cell, self.encoding)

    @property
    def filters_per_crossbar(self) -> int:
        """F = cols // c filters share one crossbar."""
        return self.cols // self.cells_per_weight

    @property
    def qmax(self) -> int:
        return 2 ** (self.weight_bits - 1) - 1

    @property
    def stucking(self) -> bool:
        """True when some cells can be stuck (rule 7: p = 1 or L = 0 means no stucking)."""
        return (self.stuck_slices > 0 and self.reprogram_fraction < 1.0)

    @property
    def compensation_bits(self) -> int:
        """Bits of the cells in slices < stuck_slices of one weight: rule 13 enumerates at most
        2**(this - bits_per_cell) assignments per weight (at least one cell is held)."""
        return self.arrays * self.stuck_slices * self.bits_per_cell

    @property
    def wear_period(self) -> int:
        """Rule 14: steady passes before the mapping offsets repeat (1 without wear levelling)."""
        if self.wear_leveling == "rotate_rows":
            return self.rows
        if self.wear_leveling == "rotate":
            return math.lcm(self.rows, self.cols)
        return 1

    def pass_offset(self, t: int) -> tuple:
        """Rule 14: (row, column) offset of the mapping in pass t (0 = initial programming)."""
        if self.wear_leveling == "rotate_rows":
            return (t % self.rows, 0)
        if self.wear_leveling == "rotate":
            return (t % self.rows, t % self.cols)
        return (0, 0)

    @property
    def encoding_id(self) -> int:
        return ENCODINGS.index(self.encoding)

    # Conversions.
    def _check_device(self, bad) -> None:
        """``device``: a preset name or a device YAML path (a string, resolved when used, by
        :meth:`load_device`: a config does no file I/O), or the device's values (a
        :class:`~crossbar_torch.device.Device` or a mapping of its fields, as a checkpoint
        stores them), validated here."""
        from .device import Device
        dev = self.device
        if isinstance(dev, Mapping):
            try:
                dev = Device(**dict(dev))
            except TypeError as e:
                bad("device", f"a preset name, a device YAML path or the device's values ({e})")
            object.__setattr__(self, "device", dev)
        elif isinstance(dev, os.PathLike):
            object.__setattr__(self, "device", os.fspath(dev))
        elif not isinstance(dev, Device) and (not isinstance(dev, str) or not dev.strip()):
            bad("device", "a device preset name, a path to a device YAML, or a Device")

    def load_device(self):
        """The :class:`~crossbar_torch.device.Device` of ``device``: a preset or a device YAML is
        read here (cached; a :class:`~crossbar_torch.errors.DeviceError` names what is wrong)."""
        from .device import Device, load_device
        return self.device if isinstance(self.device, Device) else load_device(self.device)

    def with_device_values(self) -> "CrossbarConfig":
        """This config with ``device`` replaced by the device's values (its ``source`` path
        dropped): what a checkpoint stores, so that it loads anywhere, with no preset or file
        around it."""
        return self.replace(device=dataclasses.replace(self.load_device(), source=""))

    def diff(self, other, ignore: Iterable[str] = ()) -> dict:
        """``{field: (mine, theirs)}`` for every field whose value differs from ``other``'s (a
        CrossbarConfig, or a mapping of its fields such as a saved ``to_dict()``: a field it
        lacks holds its default), in field order; ``ignore``: fields left out. Values are
        compared in their ``to_dict()`` form; a device given by name and one given by values
        are equal when the named one has the same values (reading its preset or file)."""
        ignore = set(ignore)
        mine = self.to_dict()
        if isinstance(other, CrossbarConfig):
            theirs = other.to_dict()
        else:
            theirs = {**CrossbarConfig().to_dict(), **dict(other)}
        out = {}
        for k in list(mine) + [k for k in theirs if k not in mine]:
            a, b = mine.get(k), theirs.get(k)
            if k in ignore or a == b:
                continue
            if k == "device" and _same_device(a, b):
                continue
            out[k] = (a, b)
        return out

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_overrides"] = {p: dict(ch) for p, ch in self.layer_overrides}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CrossbarConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown CrossbarConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(d))

    def replace(self, **changes) -> "CrossbarConfig":
        # the fields as they are (immutable values), not to_dict's deep copy: validating a
        # config with n layer_overrides builds n configs, so a deep copy each made it O(n^2)
        # (73 overrides: seconds per convert)
        return self.from_dict({**{f.name: getattr(self, f.name) for f in fields(self)},
                               **changes})

    def baseline(self) -> "CrossbarConfig":
        """Rule 10: the same configuration with sort='none' and no stucking; placement and
        schedule are rules 5 and 6 (natural, section-major), and the mapping does not rotate
        (rule 14), so a reduction counts everything the method does against a chip programmed
        without it (docs/semantics.md). The device stays: costs compare on the same device."""
        return self.replace(sort="none", stuck_slices=0, reprogram_fraction=1.0,
                            stuck_value="initial", compensate=False, feedback="none",
                            write_penalty=0.0, feedback_sweeps=0, filter_weight="lsb",
                            layer_overrides=(), filter_order="natural",
                            schedule="section_major", wear_leveling="none",
                            **self._ideal_periphery())

    def _ideal_periphery(self) -> dict:
        """The analog fields at their ideal defaults (the baseline counts writes only)."""
        return {f.name: f.default for f in fields(self) if f.name in ANALOG_FIELDS}

    def with_overrides(self, overrides: Iterable[str]) -> "CrossbarConfig":
        """Apply ``key=value`` strings (values parsed as YAML scalars)."""
        return self.replace(**parse_overrides(overrides))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "CrossbarConfig":
        import yaml
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of CrossbarConfig fields")
        if "crossbar" in data:  # the fields under one 'crossbar:' section, or all at the top
            others = sorted(str(k) for k in data if k != "crossbar")
            if others:
                raise ConfigError(f"{path}: has a 'crossbar:' section and top-level key(s) "
                                  f"{others}: put every CrossbarConfig field under 'crossbar:' "
                                  "or every one at the top level")
            data = data["crossbar"]
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: 'crossbar:' must be a mapping of CrossbarConfig "
                                  "fields")
        return cls.from_dict(data)

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        import yaml
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            atomic_write_text(path, text)
        return text


@functools.lru_cache(maxsize=4096)
def _config_for_layer(config: CrossbarConfig, name: str) -> CrossbarConfig:
    if not config.layer_overrides:
        return config
    changes = {}
    for pattern, ch in config.layer_overrides:
        if fnmatch.fnmatchcase(name, pattern):
            changes.update(ch)
    return config.replace(layer_overrides=(), **changes)


def unmatched_patterns(config: CrossbarConfig, names: Iterable[str]) -> list:
    """The layer_overrides patterns (rule 22) that match none of ``names``."""
    names = list(names)
    return [p for p, _ in config.layer_overrides
            if not any(fnmatch.fnmatchcase(n, p) for n in names)]


def ignored_settings(config: CrossbarConfig) -> list:
    """Settings of ``config`` that change nothing, given its other fields (each a sentence
    saying why): accepted, since a sweep may set them on every run, but worth a warning
    (:func:`crossbar_torch.convert` gives one for each)."""
    out = []
    if (config.drift_nu or config.drift_nu_std) and config.t_inference <= 1.0:
        out.append(f"drift_nu={config.drift_nu:g}, drift_nu_std={config.drift_nu_std:g} change "
                   f"nothing at t_inference={config.t_inference:g} (drift counts from t0 = 1 s); "
                   "set t_inference, the seconds since programming, above 1")
    if config.adc_range != "full" and config.adc_bits is None:
        out.append(f"adc_range={config.adc_range!r} changes nothing without adc_bits (an ideal "
                   "ADC has no range)")
    if config.input_bits_per_cycle != 1 and config.input_bits is None:
        out.append(f"input_bits_per_cycle={config.input_bits_per_cycle} changes nothing without "
                   "input_bits (ideal inputs are not bit-serial)")
    if config.filter_weight != "lsb" and not any(
            float(v) > 0 for v in config.values_anywhere("write_penalty")):
        out.append(f"filter_weight={config.filter_weight!r} changes nothing without a "
                   "write_penalty (rules 25 and 26 weigh each filter's error against its writes)")
    # rule 22: stucking may come from a per-layer override
    if config.compensate and not getattr(config, "stucking_anywhere", config.stucking):
        out.append(f"compensate=True changes nothing without bit stucking (stuck_slices="
                   f"{config.stuck_slices}, reprogram_fraction={config.reprogram_fraction}): "
                   "rule 13 sets the free cells of weights with stuck cells")
    return out


def _same_device(a, b) -> bool:
    """Two ``device`` values in ``to_dict()`` form (a name or path, or a dict of values) mean
    the same device: equal values, ``source`` aside."""
    from .device import load_device

    def values(d):
        if isinstance(d, Mapping):
            d = {**d, "source": ""}
        else:
            try:
                d = {**load_device(d).to_dict(), "source": ""}
            except (ValueError, OSError):
                return None
        return d

    if isinstance(a, str) and isinstance(b, str):
        return False  # different names or paths: different settings, whatever their values
    va, vb = values(a), values(b)
    return va is not None and va == vb


def parse_overrides(overrides: Iterable[str]) -> dict:
    import yaml
    known = {f.name for f in fields(CrossbarConfig)}
    if isinstance(overrides, str):  # one "key=value", not its characters
        overrides = [overrides]
    out = {}
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if key not in known:
            raise ConfigError(f"override {item!r}: unknown field {key!r}; known: {sorted(known)}")
        parsed = yaml.safe_load(value) if value.strip() else value
        if isinstance(parsed, str):  # YAML 1.1 reads "1e-1" as a string: take numbers as such
            for cast in (int, float):
                try:
                    parsed = cast(parsed)
                    break
                except ValueError:
                    pass
        out[key] = parsed
    return out


def load_config(path: str | None = None, overrides: Iterable[str] = ()) -> CrossbarConfig:
    """What scripts call: YAML file (or defaults) then ``--set`` overrides."""
    cfg = CrossbarConfig.from_yaml(path) if path else CrossbarConfig()
    return cfg.with_overrides(overrides)


def _umask() -> int:
    """The process umask (Linux: read from /proc, which leaves it untouched; elsewhere set and
    restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, write, binary: bool = False) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, flush it to disk, then rename it
    over ``path``: a reader never sees half a result or checkpoint. The file gets the mode a
    plain ``open(path, "w")`` would give (0666 minus the umask), not mkstemp's 0600."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))
