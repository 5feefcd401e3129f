"""The frontier's runs: the sweep files read by the one sweep loader
(:func:`crossbar_torch.apps.sweep.load_sweep`, its rules), with the reference row ``crossbar8``
put first (:func:`load_sweeps`)."""
from __future__ import annotations

import json
from dataclasses import fields
from typing import Iterable, List, Sequence

from ...config import CrossbarConfig, parse_overrides
from ..sweep import SweepError, SweepRun, load_sweep
from .errors import FrontierError

REFERENCE = "crossbar8"
CONFIG_FIELDS = tuple(f.name for f in fields(CrossbarConfig))


def reference_config(base: CrossbarConfig) -> CrossbarConfig:
    """The ideal 8-bit crossbar of a sweep, every drop's reference: its base with no stucking,
    no compensation, plain rounding (no rule 21 feedback, rule 23 penalty, rule 24 sweeps or
    rule 22 per-layer policy: a feedback preset given as a sweep is not its own reference) and an
    ideal
    periphery (no DAC, ADC, noise, drift or finite g_ratio), so a ``--set`` of those fields
    changes every row but this one."""
    return base.replace(stuck_slices=0, reprogram_fraction=1.0, stuck_value="initial",
                        compensate=False, feedback="none", write_penalty=0.0,
                        feedback_sweeps=0, filter_weight="lsb", layer_overrides=(),
                        **base._ideal_periphery())


def _is_lossless(cfg: CrossbarConfig) -> bool:
    return not cfg.stucking and cfg.stuck_value == "initial"


def load_sweeps(paths: Sequence[str], overrides: Iterable[str] = ()) -> List[SweepRun]:
    """The runs of one or more sweep files (:func:`~crossbar_torch.apps.sweep.load_sweep`:
    sweeps ``{base, runs}`` or plain configs), with ``overrides`` (``key=value``, the ``--set``
    flag) applied to every run, reference row first: the sweep's own ``crossbar8`` (which must
    have no stucking and an ideal periphery, checked without ``--set``; ``--set`` changes it
    but for those fields) or, when no file names it, :func:`reference_config` of the first
    file's base. Raises :class:`FrontierError` naming the file, the run and the field."""
    try:
        loaded = load_sweep(paths, overrides)
    except SweepError as e:
        raise FrontierError(str(e)) from None
    runs: List[SweepRun] = []
    for run in loaded:
        if run.name == REFERENCE:  # the sweep's own reference: checked without --set
            own = CrossbarConfig.from_dict(run.fields)  # valid: load_sweep built it
            if not _is_lossless(own) or own.analog:
                raise FrontierError(
                    f"{run.source}: run {REFERENCE!r} is the reference 8-bit crossbar: it must "
                    "have no stucking (stuck_slices 0 or reprogram_fraction 1, stuck_value "
                    "initial) and an ideal periphery (no input_bits, adc_bits, g_ratio, "
                    "noise or drift)")
            run = SweepRun(run.name, reference_config(run.config), run.source, run.fields,
                           run.base)
            runs.insert(0, run)
        else:
            runs.append(run)
    if runs[0].name != REFERENCE:  # the first file's base, --set applied (valid: checked)
        base = CrossbarConfig.from_dict({**loaded[0].base, **parse_overrides(overrides)})
        runs.insert(0, SweepRun(REFERENCE, reference_config(base), "reference"))
    return runs


def varying_fields(configs: Iterable[CrossbarConfig]) -> List[str]:
    """The CrossbarConfig fields whose value differs between ``configs`` (field order)."""
    dicts = [c.to_dict() for c in configs]
    return [f for f in CONFIG_FIELDS if len({json.dumps(d[f]) for d in dicts}) > 1]
