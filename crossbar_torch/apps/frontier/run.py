"""The frontier run (:func:`run_frontier`): for every run of the sweep, convert a fresh copy of
the float model, count its writes, score it, and rewrite the CSV / JSON; resumable. Under
``torchrun`` every rank converts and scores its share of the data (:mod:`.shard`), rank 0 alone
counts the writes and writes the files."""
from __future__ import annotations

import json
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch.nn as nn

from ...nn.conversion import convert
from ...programming import reprogram
from ...report import reprogram_report
from ..sweep import SweepRun
from .metrics import weight_error
from .plot import plot_frontier
from .shard import on_rank0, rank_world
from .store import SETUP_COLUMN, check_setup, read_previous, write_outputs
from .sweeps import REFERENCE


def run_frontier(float_model: nn.Module, runs: Sequence[SweepRun], scorer, *, csv_path: str,
                 json_path: Optional[str] = None, png_path: Optional[str] = None,
                 meta: Optional[dict] = None, previous: Optional[Dict[str, dict]] = None,
                 float_cache: Optional[str] = None, progress: bool = False,
                 log: Callable[[str], None] = lambda s: None, title: str = "") -> List[dict]:
    """Evaluate every run (skipping those ``previous`` holds), rewriting the CSV / JSON after
    each row; draw the PNG at the end. Returns the rows (sweep order, then rows of the previous
    CSV the sweep does not name). Under ``torchrun`` every rank calls it (with a scorer over
    its share of the data); every rank returns the same rows, rank 0 alone writes the files."""
    if not runs or runs[0].name != REFERENCE:
        raise ValueError(f"run_frontier: the first run must be the reference {REFERENCE!r} "
                         "(load_sweeps puts it there)")
    meta = dict(meta or {})
    rank0 = rank_world()[0] == 0
    if not rank0:  # one process writes and speaks
        log, progress = (lambda s: None), False
    previous = dict(previous if previous is not None else read_previous(csv_path, runs,
                                                                        type(scorer)))
    if meta.get(SETUP_COLUMN) is not None:
        meta[SETUP_COLUMN] = json.loads(json.dumps(meta[SETUP_COLUMN]))  # as read back
        check_setup(previous, meta[SETUP_COLUMN], csv_path)
    names = {r.name for r in runs}
    extra = [row for name, row in previous.items() if name not in names]
    if extra:
        log(f"keeping {len(extra)} row(s) of {csv_path} the sweep does not name: "
            + ", ".join(r["name"] for r in extra))
    todo = [r for r in runs if r.name not in previous]
    if len(todo) < len(runs):
        log(f"resuming {csv_path}: {len(runs) - len(todo)} row(s) already measured, "
            f"{len(todo)} to go")
    t0 = time.perf_counter()
    meta["float"] = scorer.reference(float_model, float_cache)
    meta["float_seconds"] = time.perf_counter() - t0

    rows: Dict[str, dict] = {}
    for r in runs:
        if r.name in previous:
            rows[r.name] = dict(previous[r.name])
    done_order = lambda: [rows[r.name] for r in runs if r.name in rows] + extra  # noqa: E731

    def refresh_drops():
        ref = rows.get(REFERENCE)
        paired = getattr(scorer, "paired", None)  # images: the paired interval of the drop
        for row in list(rows.values()) + extra:
            p = row.get(scorer.primary)
            row[scorer.drop] = (ref[scorer.primary] - p
                                if ref is not None and p is not None else None)
            if paired is not None:
                row.update(paired(ref, row))

    from tqdm.auto import tqdm
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc="frontier", unit="config",
               disable=not progress, dynamic_ncols=True)
    try:
        for run in todo:
            bar.set_postfix_str(run.name[:40])
            t1 = time.perf_counter()
            xmodel = convert(float_model, run.config)  # a fresh deep copy, programmed
            feedback = run.config.feedback != "none"
            if run.config.analog or feedback:  # rules 20, 21: ranges / moments from samples
                scorer.calibrate(xmodel)
            if feedback:  # rule 21 programs with the moments just measured
                reprogram(xmodel)
            # counted once, on rank 0 (every rank holds the same programmed model)
            rep, werr = on_rank0(lambda: (reprogram_report(xmodel).to_dict(),
                                          weight_error(xmodel)))
            t2 = time.perf_counter()
            scores = scorer.score(xmodel)
            t3 = time.perf_counter()
            del xmodel
            red = rep["reduction"]
            row = {"name": run.name, "config": run.config,
                   "writes_per_pass": rep["writes_per_pass"],
                   "baseline_writes_per_pass": rep["baseline_writes_per_pass"],
                   "reduction": float("inf") if red == "inf" else red,
                   "initial_writes": rep["initial_writes"],
                   **scores,
                   "weight_error": werr["weight_error"],
                   "convert_seconds": round(t2 - t1, 3), "eval_seconds": round(t3 - t2, 3)}
            rows[run.name] = row
            refresh_drops()
            if rank0:
                write_outputs(done_order(), type(scorer), csv_path, json_path, meta)
            red_s = f"{row['reduction']:.3f}x" if row["reduction"] is not None else "n/a"
            with tqdm.external_write_mode(file=sys.stderr):  # a line above the bar
                log(f"{run.name}: reduction {red_s}, {scorer.primary} {row[scorer.primary]:.4f}, "
                    f"drop {row[scorer.drop]:+.4f}, weight error {row['weight_error']:.4f} "
                    f"({t3 - t1:.0f} s)")
            bar.update(1)
    finally:
        bar.close()
    refresh_drops()
    out = done_order()
    if rank0:
        write_outputs(out, type(scorer), csv_path, json_path, meta)
        if png_path:
            plot_frontier(out, png_path, type(scorer), title=title)
    return out

