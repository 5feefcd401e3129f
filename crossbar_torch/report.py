"""The reprogram report: what a user reads to decide on a configuration (rules 8 and 10)."""
from __future__ import annotations

import csv
import io
import json

import torch.nn as nn

from .config import CrossbarConfig, atomic_write_text
from .mapping import format_order
from .programming import ProgramResult, last_program, program_model


class ReprogramReport:
    """Counts of a configuration against its baseline (no sort, no stucking)."""

    def __init__(self, result: ProgramResult, baseline: ProgramResult | None, model_name=None):
        self.result = result
        self.baseline = baseline
        self.model_name = model_name

    @property
    def writes_per_pass(self) -> int:
        return self.result.per_pass.writes

    @property
    def reduction(self) -> float | None:
        if self.baseline is None:
            return None
        base, mine = self.baseline.per_pass.writes, self.result.per_pass.writes
        if mine == 0:
            return None if base == 0 else float("inf")
        return base / mine

    def to_dict(self) -> dict:
        r, b = self.result, self.baseline
        red = self.reduction
        d = {
            "model": self.model_name,
            "tiles": r.tiles,
            "pool": r.config.pool,
            "layer_count": len(r.layers),
            "weights": sum(l["shape"][0] * l["shape"][1] for l in r.layers),
            "initial_writes": r.initial.writes,
            "writes_per_pass": r.per_pass.writes,
            "set_writes_per_pass": r.per_pass.sets,
            "reset_writes_per_pass": r.per_pass.resets,
            "pulses_per_pass": r.per_pass.pulses,
            "rows_programmed_per_pass": r.per_pass.rows_programmed,
            "baseline_writes_per_pass": b.per_pass.writes if b else None,
            "baseline_rows_programmed_per_pass": b.per_pass.rows_programmed if b else None,
            # JSON has no infinity: a configuration with 0 writes against a non-zero baseline
            # reports the string "inf"; 0 against 0 reports null.
            "reduction": ("inf" if red == float("inf") else red),
            "per_slice": {str(i): v for i, v in enumerate(r.per_pass.per_slice)},
            "baseline_per_slice": ({str(i): v for i, v in enumerate(b.per_pass.per_slice)}
                                   if b else None),
            "layers": [{"name": l["name"], "tiles": l["tiles"],
                        "writes_per_pass": l["writes_per_pass"],
                        "initial_writes": l["initial_writes"], "shape": l["shape"],
                        # tile ids (s * column blocks + j) in programming order (rule 12)
                        "tile_order": l["tile_order"],
                        **({"baseline_writes_per_pass": bl["writes_per_pass"]} if b else {})}
                       for l, bl in zip(r.layers, b.layers if b else r.layers)],
            "max_cell_writes_per_pass": r.max_cell_writes_per_pass,
            "config": r.config.to_dict(),
        }
        return d

    def to_json(self, path=None, indent=2) -> str:
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            atomic_write_text(path, text + "\n")
        return text

    def to_csv(self, path=None) -> str:
        """One row per layer plus a TOTAL row. ``weight_shape``: the layer's weight matrix
        (out x K, as mapped); ``crossbar``: the crossbar size (rows x cols) of the config."""
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["layer", "weight_shape", "crossbar", "tiles", "initial_writes",
                    "writes_per_pass", "baseline_writes_per_pass", "reduction"])
        d = self.to_dict()
        xbar = f"{self.result.config.rows}x{self.result.config.cols}"
        for l in d["layers"]:
            base = l.get("baseline_writes_per_pass")
            red = (base / l["writes_per_pass"]) if base is not None and l["writes_per_pass"] else ""
            w.writerow([l["name"], "x".join(map(str, l["shape"])), xbar, l["tiles"],
                        l["initial_writes"], l["writes_per_pass"], base if base is not None else "",
                        f"{red:.4f}" if red != "" else ""])
        red = d["reduction"]
        w.writerow(["TOTAL", "", xbar, d["tiles"], d["initial_writes"], d["writes_per_pass"],
                    d["baseline_writes_per_pass"] if d["baseline_writes_per_pass"] is not None else "",
                    f"{red:.4f}" if isinstance(red, float) else (red or "")])
        text = buf.getvalue()
        if path is not None:
            atomic_write_text(path, text)
        return text

    def __str__(self) -> str:
        d = self.to_dict()
        cfg = self.result.config
        lines = []
        title = f"Reprogram report{(' - ' + self.model_name) if self.model_name else ''}"
        lines.append(title)
        lines.append("=" * len(title))
        lines.append(f"crossbar {cfg.rows}x{cfg.cols}, pool {cfg.pool}, {cfg.weight_bits}-bit "
                     f"{cfg.encoding}, {cfg.bits_per_cell} bit/cell, sort={cfg.sort}, "
                     f"stuck_slices={cfg.stuck_slices}, reprogram_fraction="
                     f"{cfg.reprogram_fraction}, stuck_value={cfg.stuck_value}, seed={cfg.seed}")
        lines.append(f"filter_order={cfg.filter_order}, schedule={cfg.schedule}"
                     + (f" (window {cfg.schedule_window})" if cfg.schedule == "greedy" else "")
                     + f", compensate={str(cfg.compensate).lower()}")
        lines.append(f"layers {d['layer_count']}, weights {d['weights']:,}, tiles {d['tiles']:,}")
        lines.append("")

        def row(k, v):
            lines.append(f"  {k:<34}{v:>18}")

        fmt = lambda v: f"{v:,}" if isinstance(v, int) else str(v)  # noqa: E731
        row("initial programming writes", fmt(d["initial_writes"]))
        row("writes per pass", fmt(d["writes_per_pass"]))
        row("  SET / RESET", f"{d['set_writes_per_pass']:,} / {d['reset_writes_per_pass']:,}")
        row("  pulses", fmt(d["pulses_per_pass"]))
        row("  rows programmed", fmt(d["rows_programmed_per_pass"]))
        row("max writes of one cell per pass", fmt(d["max_cell_writes_per_pass"]))
        if self.baseline is not None:
            row("baseline writes per pass", fmt(d["baseline_writes_per_pass"]))
            red = d["reduction"]
            row("reduction (baseline / this)", f"{red:.3f}x" if isinstance(red, float) else str(red))
        lines.append("")
        lines.append("  writes per pass by slice (0 = least significant)")
        base_sl = d["baseline_per_slice"] or {}
        for s, v in d["per_slice"].items():
            extra = f"   baseline {base_sl[s]:>14,}" if s in base_sl else ""
            lines.append(f"    slice {s:>2}: {v:>14,}{extra}")
        lines.append("")
        lines.append(f"  {'layer':<40}{'tiles':>8}{'writes/pass':>14}"
                     + (f"{'baseline':>14}{'reduction':>10}" if self.baseline else "")
                     + "  tile order (ids s*blocks+j; a-b = a run)")
        for l in d["layers"]:
            s = f"  {l['name'][:40]:<40}{l['tiles']:>8,}{l['writes_per_pass']:>14,}"
            if self.baseline is not None:
                b = l["baseline_writes_per_pass"]
                r = f"{b / l['writes_per_pass']:.2f}x" if l["writes_per_pass"] else "-"
                s += f"{b:>14,}{r:>10}"
            lines.append(s + "  " + format_order(l["tile_order"], width=60))
        return "\n".join(lines)

    def __repr__(self) -> str:
        red = self.reduction
        return (f"ReprogramReport(writes_per_pass={self.writes_per_pass}, "
                f"reduction={red if red is None else round(red, 4)})")


def reprogram_report(model: nn.Module, config: CrossbarConfig | None = None, *,
                     baseline: bool = True, progress: bool = False,
                     model_name: str | None = None, reuse: bool = True) -> ReprogramReport:
    """Count the writes of programming ``model`` (its current weights, fixed sort index and
    stuck cells) and of the baseline. Pure: the model is not changed. With ``reuse``, the
    counts of the model's last programming are taken as they are when nothing it depends on
    has changed since (same numbers, one programming fewer); ``reuse=False`` always counts."""
    result = last_program(model, config) if reuse else None
    if result is None:
        result = program_model(model, config, progress=progress)
    base = program_model(model, config, baseline=True, progress=progress) if baseline else None
    return ReprogramReport(result, base, model_name=model_name)
