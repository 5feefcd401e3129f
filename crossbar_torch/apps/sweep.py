"""The one sweep loader of ``scripts/reprogram_report.py --sweep`` and ``scripts/frontier.py
--sweep``: both read their YAML files with :func:`load_sweep`, under one set of rules.

A file is one of:

* a **sweep**: ``{base: {CrossbarConfig fields}, runs: [{name: ..., field: value, ...}, ...]}``;
  every run is ``base`` updated with the run's own fields;
* a **plain config** (no ``runs`` key): a mapping of CrossbarConfig fields (or
  ``{crossbar: {fields}}``, as ``--config`` reads it): a one-run sweep whose run is named after
  the file (``configs/paper.yaml`` -> ``paper``) and whose base is that config.

Rules (each mistake is a :class:`SweepError`, one line naming the file, and the run, field or
key):

1. The file exists, is a file, is valid YAML, and holds a mapping (an empty file is refused).
2. Unknown keys are refused: a sweep's top level holds only ``base`` and ``runs``; a plain
   config only CrossbarConfig fields (or the single key ``crossbar``); a field unknown to
   CrossbarConfig, in ``base``, a run or a plain config, is refused naming the field.
3. ``runs`` is a non-empty list of mappings, each with a ``name``: a non-empty, one-line
   string (a number is taken as its text).
4. Run names are unique across all the files given: a repeated name is refused naming both
   files (names key the rows of the report's table, CSV and JSON and of the frontier's CSV;
   renaming one silently would let two files' results be confused).
5. ``--set key=value`` overrides apply to every run, after ``base`` and the run's fields; an
   override that makes a valid run invalid is blamed on ``--set``.
6. Each run's device (the ``device`` field: a preset or a device YAML) is resolved now, so a bad
   device is refused before any model is built.

The frontier tool adds its reference row ``crossbar8`` on top (``apps/frontier/sweeps.py``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

from ..config import CrossbarConfig, parse_overrides
from ..errors import UsageError

__all__ = ["SweepError", "SweepRun", "load_sweep", "SWEEP_KEYS"]

SWEEP_KEYS = ("base", "runs")


class SweepError(UsageError):
    """A sweep file (or a ``--set`` applied to it) breaks a rule of :func:`load_sweep`."""


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its ``name``, its ``config`` (overrides applied), the file it came
    from (``source``), its ``fields`` as written there (base and run, no override) and that
    file's ``base`` (a plain config is its own base)."""
    name: str
    config: CrossbarConfig
    source: str
    fields: Optional[dict] = None
    base: Optional[dict] = None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _read(path: str):
    import yaml
    if os.path.isdir(path):
        raise SweepError(f"sweep {path!r} is a folder, not a YAML file")
    if not os.path.isfile(path):
        raise SweepError(f"sweep file not found: {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        from .cli import yaml_error_message
        raise SweepError(yaml_error_message(path, e)) from None
    except UnicodeDecodeError as e:
        raise SweepError(f"{path}: not a text (YAML) file: {e.reason}") from None
    except OSError as e:
        raise SweepError(f"{path}: cannot be read ({e.strerror or e})") from None


def _config(path: str, what: str, fields: dict, over: dict) -> CrossbarConfig:
    """``fields`` then the overrides as a config, its device resolved; an error names the file
    and ``what`` (and blames ``--set`` when the fields are valid without it)."""
    try:
        cfg = CrossbarConfig.from_dict({**fields, **over})
        cfg.load_device()
        return cfg
    except (ValueError, TypeError) as e:
        if over:
            try:
                CrossbarConfig.from_dict(fields).load_device()
            except (ValueError, TypeError):
                pass
            else:
                sets = " ".join(f"--set {k}={v}" for k, v in over.items())
                raise SweepError(f"{sets}: makes {what} of {path} invalid: {_one_line(e)}") \
                    from None
        raise SweepError(f"{path}: {what}: {_one_line(e)}") from None


def _name(path: str, i: int, run: dict) -> str:
    if "name" not in run:
        raise SweepError(f"{path}: runs[{i}] has no 'name' (every run is named: names key "
                         "the rows of the results)")
    name = run["name"]
    if isinstance(name, bool) or not isinstance(name, (str, int, float)) or \
            not str(name).strip():
        raise SweepError(f"{path}: runs[{i}]: name {name!r} must be a non-empty string")
    name = str(name).strip()
    if any(ch in name for ch in "\n\r"):
        raise SweepError(f"{path}: runs[{i}]: name {name!r} must be one line")
    return name


def _runs_of(path: str, data, over: dict) -> List[SweepRun]:
    if data is None:
        raise SweepError(f"{path}: the file is empty; expected a sweep {{base: {{...}}, runs: "
                         "[{name: ..., ...}]} or a config (a mapping of CrossbarConfig fields)")
    if not isinstance(data, dict):
        raise SweepError(f"{path}: expected a sweep {{base, runs}} or a config mapping, got a "
                         f"{type(data).__name__}")
    if "runs" not in data:  # a plain config: one run named after the file
        if "base" in data:
            raise SweepError(f"{path}: has 'base' but no 'runs'; a sweep is {{base: {{...}}, "
                             "runs: [{name: ..., field: value}, ...]}")
        if "crossbar" in data:
            extra = sorted(set(data) - {"crossbar"})
            if extra:
                raise SweepError(f"{path}: unknown key(s) {extra} beside 'crossbar'")
            data = data["crossbar"]
            if not isinstance(data, dict):
                raise SweepError(f"{path}: 'crossbar' must be a mapping of CrossbarConfig fields")
        name = os.path.splitext(os.path.basename(path))[0]
        return [SweepRun(name, _config(path, "config", data, over), path, dict(data), dict(data))]
    extra = sorted(set(data) - set(SWEEP_KEYS))
    if extra:
        raise SweepError(f"{path}: unknown top-level key(s) {extra}; a sweep holds only 'base' "
                         "and 'runs'")
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise SweepError(f"{path}: 'base' must be a mapping of CrossbarConfig fields")
    runs = data["runs"]
    if not isinstance(runs, list) or not runs:
        raise SweepError(f"{path}: 'runs' must be a non-empty list of {{name: ..., field: "
                         "value, ...}")
    _config(path, "base", base, over)  # a bad base is named as the base, not as a run
    out = []
    for i, run in enumerate(runs):
        if not isinstance(run, dict):
            raise SweepError(f"{path}: runs[{i}] must be a mapping with a 'name' and config "
                             "fields")
        name = _name(path, i, run)
        fields = {**base, **{k: v for k, v in run.items() if k != "name"}}
        out.append(SweepRun(name, _config(path, f"run {name!r}", fields, over), path, fields,
                            dict(base)))
    return out


def load_sweep(paths: Sequence[str], overrides: Iterable[str] = ()) -> List[SweepRun]:
    """The runs of the sweep files ``paths`` in order (files, then runs), ``overrides``
    (``key=value``, the ``--set`` flag) applied to each; the rules are the module's."""
    if not paths:
        raise SweepError("no sweep file given")
    import yaml
    try:
        over = parse_overrides(overrides)
    except (ValueError, yaml.YAMLError) as e:
        raise SweepError(f"--set: {_one_line(e)}") from None
    runs: List[SweepRun] = []
    where = {}
    for path in paths:
        for run in _runs_of(path, _read(path), over):
            if run.name in where:
                first = where[run.name]
                where_ = (f"twice in {path}" if first == path
                          else f"in both {first} and {path}")
                raise SweepError(f"run name {run.name!r} appears {where_}; names key the rows "
                                 "of the results: make them unique")
            where[run.name] = path
            runs.append(run)
    return runs
