"""The frontier's results on disk: the CSV (one line per row; read back to resume a run,
:func:`read_previous`, after :func:`check_setup`) and the JSON (the same rows with their full
configurations, the float model's scores and the Pareto front), both rewritten atomically
(:func:`write_outputs`)."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from typing import Dict, List, Optional, Sequence

from ...config import CrossbarConfig, atomic_write_text
from ..sweep import SweepRun
from .errors import FrontierError
from .metrics import decode_bits, pareto_front
from .sweeps import REFERENCE, varying_fields

REPORT_COLUMNS = (("writes_per_pass", int), ("baseline_writes_per_pass", int),
                  ("reduction", float), ("initial_writes", int))
TAIL_COLUMNS = (("weight_error", float), ("convert_seconds", float), ("eval_seconds", float))


def _columns(scorer_cls, varying: Sequence[str]) -> List[str]:
    return (["name", *varying] + [c for c, _ in REPORT_COLUMNS]
            + [c for c, _ in scorer_cls.metrics] + [c for c, _ in TAIL_COLUMNS] + ["config"])


def _types(scorer_cls) -> dict:
    return dict(REPORT_COLUMNS + tuple(scorer_cls.metrics) + TAIL_COLUMNS)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "inf" if v == float("inf") else repr(v)
    return str(v)


def _parse(text: str, typ):
    if text == "":
        return None
    if typ is int:
        return int(text)
    if typ is str:
        return text
    return float(text)


SETUP_COLUMN = "setup"  # what every row was measured on: model, weights, data, reference


def _brief(v, limit: int = 70) -> str:
    text = json.dumps(v, sort_keys=True)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _predates(key: str, field: str, theirs: dict, ours: dict) -> bool:
    """A config field the CSV's reference row predates (added to CrossbarConfig since) is the
    same setup when this run has it at its default, as for a loaded state dict."""
    if key != "reference" or field in theirs:
        return False
    defaults = {f.name: f.default for f in dataclasses.fields(CrossbarConfig)}
    return field in defaults and ours.get(field) == defaults[field]


def check_setup(previous: Dict[str, dict], setup: dict, csv_path: str) -> None:
    """Refuse to resume a CSV whose rows were measured on another setup than ``setup`` (the
    model, its weights, the data and its preprocessing, the reference row: what the script
    puts in ``meta["setup"]``), naming every field that differs; or whose rows carry no setup
    (written by hand or by an older version), since nothing says what they measured."""
    for name, row in previous.items():
        theirs = row.get(SETUP_COLUMN)
        if theirs is None:
            raise FrontierError(
                f"{csv_path}: row {name!r} carries no record of the model and data it was "
                "measured on (a CSV written by hand or by an older frontier.py), so it cannot "
                "be resumed; write to another --csv, or remove it to measure every row again")
        diff = []
        for k in sorted(set(theirs) | set(setup)):
            a, b = theirs.get(k), setup.get(k)
            if isinstance(a, dict) and isinstance(b, dict):  # name the fields inside
                diff += [(f"{k}.{j}", a.get(j), b.get(j)) for j in sorted(set(a) | set(b))
                         if a.get(j) != b.get(j) and not _predates(k, j, a, b)]
            elif a != b:
                diff.append((k, a, b))
        if diff:
            raise FrontierError(
                f"{csv_path} was measured on another setup than this run's: "
                + "; ".join(f"{k} {_brief(a)} (csv) vs {_brief(b)} (now)" for k, a, b in diff)
                + "; write to another --csv, or remove it to measure every row again")


def read_previous(csv_path: Optional[str], runs: Sequence[SweepRun], scorer_cls) -> Dict[str, dict]:
    """Rows of an earlier run of the tool (``{name: row}``), checked against the sweep: a row
    whose configuration is not the one the sweep gives its name is an error (a mislabelled
    result), so is a CSV the tool did not write. Rows the sweep does not name are kept."""
    if not csv_path or not os.path.exists(csv_path):
        return {}
    if os.path.isdir(csv_path):
        raise FrontierError(f"--csv {csv_path!r} is a folder; give a file path")
    types = _types(scorer_cls)
    try:
        with open(csv_path, newline="") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise FrontierError(f"{csv_path}: cannot read the previous results ({e})") from None
    if not text.strip():
        return {}
    reader = csv.DictReader(io.StringIO(text))
    need = {"name", "config", *[c for c, _ in REPORT_COLUMNS], scorer_cls.primary}
    missing = sorted(need - set(reader.fieldnames or ()))
    if missing:
        raise FrontierError(f"{csv_path}: not a {scorer_cls.kind} frontier CSV (missing columns "
                            f"{missing}); write to another --csv or remove it")
    by_name = {r.name: r for r in runs}
    out: Dict[str, dict] = {}
    for line, rec in enumerate(reader, start=2):
        name = rec.get("name") or ""
        try:
            cfg = CrossbarConfig.from_dict(json.loads(rec["config"]))
            row = {"name": name, "config": cfg}
            for col, typ in types.items():
                if col in rec:
                    row[col] = _parse(rec[col], typ)
            if row.get("top1_bits") is not None:  # per-image record: as many as the images
                decode_bits(row["top1_bits"], row.get("images") or 0)
            setup = rec.get(SETUP_COLUMN)
            row[SETUP_COLUMN] = json.loads(setup) if setup else None
        except (ValueError, TypeError, KeyError) as e:
            raise FrontierError(f"{csv_path}: line {line} (row {name!r}) cannot be read ({e}); "
                                "fix or remove it") from None
        if name in out:
            raise FrontierError(f"{csv_path}: row {name!r} appears twice (line {line})")
        run = by_name.get(name)
        diff = cfg.diff(run.config) if run is not None else {}
        if diff:
            raise FrontierError(f"{csv_path}: row {name!r} was measured with another config "
                                f"(field: (csv, sweep) {diff}); remove that line or write to "
                                "another --csv")
        out[name] = row
    return out


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else None
    return v


def _row_points(rows: Sequence[dict], scorer_cls):
    return [(r.get("reduction"), r.get(scorer_cls.drop)) for r in rows]


def write_outputs(rows: Sequence[dict], scorer_cls, csv_path: str, json_path: Optional[str],
                  meta: dict) -> None:
    """Rewrite the CSV and the JSON (atomically) from ``rows``."""
    varying = varying_fields([r["config"] for r in rows]) if len(rows) > 1 else []
    setup = meta.get(SETUP_COLUMN)
    cols = _columns(scorer_cls, varying) + ([SETUP_COLUMN] if setup is not None else [])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        cd = r["config"].to_dict()
        line = []
        for c in cols:
            if c == "config":
                line.append(json.dumps(cd))
            elif c == SETUP_COLUMN:  # checked when the CSV is resumed (check_setup)
                line.append(json.dumps(setup, sort_keys=True))
            elif c in varying and c not in r:
                line.append(_fmt(cd[c]))
            else:
                line.append(_fmt(r.get(c)))
        w.writerow(line)
    atomic_write_text(csv_path, buf.getvalue())
    if json_path:
        front = pareto_front(_row_points(rows, scorer_cls))
        out = {**meta,
               "reference": REFERENCE,
               "varying_fields": varying,
               "pareto_front": [rows[i]["name"] for i in front],
               "rows": [{**{k: _json_value(v) for k, v in r.items()
                            if k not in ("config", SETUP_COLUMN)},
                         "config": r["config"].to_dict()} for r in rows]}
        atomic_write_text(json_path, json.dumps(out, indent=2) + "\n")

