"""The reprogram report: what a user reads to decide on a configuration. Writes per pass and
the reduction against the baseline (rules 8 and 10); the wear of the cells, the lifetime and the
energy and time a pass of reprogramming costs on a device (rules 14 to 16)."""
from __future__ import annotations

import csv
import io
import json

import torch.nn as nn

from .config import CrossbarConfig, atomic_write_text
from .device import Device, load_device, write_cost
from .mapping import format_order
from .programming import ProgramResult, last_program, program_model


def si(value, unit: str) -> str:
    """A number with an SI prefix: si(3.2e-6, 'J') -> '3.20 uJ'."""
    if value is None:
        return "-"
    if value == 0:
        return f"0 {unit}"
    for exp, prefix in ((12, "T"), (9, "G"), (6, "M"), (3, "k"), (0, ""), (-3, "m"), (-6, "u"),
                        (-9, "n"), (-12, "p"), (-15, "f")):
        if abs(value) >= 10.0 ** exp:
            return f"{value / 10.0 ** exp:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def format_count(v, decimals: int = 2) -> str:
    """Counts as text: integers with thousands separators, a wear-levelling period's averages
    with ``decimals`` decimals, None as '-'."""
    if v is None:
        return "-"
    if isinstance(v, int) or float(v).is_integer():
        return f"{int(v):,}"
    return f"{v:,.{decimals}f}"


def _ratio(num, den):
    """num / den for a 'this against baseline' factor: None when undefined, inf for x/0."""
    if num is None or den is None:
        return None
    if den == 0:
        return None if num == 0 else float("inf")
    return num / den


def _json_ratio(r):
    # JSON has no infinity: "inf" as a string, null when undefined
    return "inf" if r == float("inf") else r


class ReprogramReport:
    """Counts of a configuration against its baseline (no sort, no stucking), with the wear,
    lifetime and cost on ``device`` (default: the configuration's)."""

    def __init__(self, result: ProgramResult, baseline: ProgramResult | None, model_name=None,
                 device: Device | str | None = None):
        self.result = result
        self.baseline = baseline
        self.model_name = model_name
        if device is None:
            device = result.config.device
        self.device = device if isinstance(device, Device) else load_device(device)

    def cost(self, r: ProgramResult | None) -> dict | None:
        """Rule 16: energy and time of one steady pass of ``r`` on the report's device."""
        if r is None:
            return None
        c = r.per_pass
        return write_cost(c.set_pulses, c.reset_pulses, c.rows_programmed, r.config.pool,
                          r.config.bits_per_cell, self.device)

    def lifetime(self, r: ProgramResult | None) -> dict | None:
        """Rule 15: passes until the first cell, and until 1% of the worn cells, wear out."""
        return None if r is None else r.cells.lifetime(self.device.endurance)

    @property
    def writes_per_pass(self) -> int:
        return self.result.per_pass.writes

    @property
    def reduction(self) -> float | None:
        if self.baseline is None:
            return None
        return _ratio(self.baseline.per_pass.writes, self.result.per_pass.writes)

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
            "set_pulses_per_pass": r.per_pass.set_pulses,
            "reset_pulses_per_pass": r.per_pass.reset_pulses,
            "rows_programmed_per_pass": r.per_pass.rows_programmed,
            "baseline_writes_per_pass": b.per_pass.writes if b else None,
            "baseline_rows_programmed_per_pass": b.per_pass.rows_programmed if b else None,
            # JSON has no infinity: a configuration with 0 writes against a non-zero baseline
            # reports the string "inf"; 0 against 0 reports null.
            "reduction": _json_ratio(red),
            "per_slice": {str(i): v for i, v in enumerate(r.per_pass.per_slice)},
            "baseline_per_slice": ({str(i): v for i, v in enumerate(b.per_pass.per_slice)}
                                   if b else None),
            "layers": [self._layer_dict(l, bl if b else None)
                       for l, bl in zip(r.layers, b.layers if b else r.layers)],
            "max_cell_writes_per_pass": r.max_cell_writes_per_pass,
            "config": r.config.to_dict(),
        }
        d.update(self._wear_dict())
        return d

    def _layer_dict(self, l: dict, bl: dict | None) -> dict:
        st = l["cell_stats"]
        return {"name": l["name"], "tiles": l["tiles"], "writes_per_pass": l["writes_per_pass"],
                "initial_writes": l["initial_writes"], "shape": l["shape"],
                # tile ids (s * column blocks + j) in programming order (rule 12)
                "tile_order": l["tile_order"],
                # rule 15 for this layer's writes alone (None past the memory bound)
                "max_cell_writes_per_pass": st.max if st else None,
                "p99_cell_writes_per_pass": st.p99 if st else None,
                "worn_cells": st.worn_cells if st else None,
                "passes_to_first_failure": (st.passes(self.device.endurance, st.max_total)
                                            if st else None),
                **({"baseline_writes_per_pass": bl["writes_per_pass"]} if bl else {})}

    def _wear_dict(self) -> dict:
        """Rules 14 to 16: wear levelling period, per-cell statistics, lifetime, cost."""
        r, b = self.result, self.baseline
        life, blife = self.lifetime(r), self.lifetime(b)
        cost, bcost = self.cost(r), self.cost(b)
        first = life["passes_to_first_failure"]
        bfirst = blife["passes_to_first_failure"] if blife else None
        return {
            "wear_leveling": r.config.wear_leveling,
            "period_passes": r.period,
            "cell_writes_per_pass": r.cells.to_dict(),
            "crossbar_max_cell_writes_per_pass": r.crossbar_max,
            "baseline_max_cell_writes_per_pass": b.max_cell_writes_per_pass if b else None,
            "device": self.device.to_dict(),
            "passes_to_first_failure": first,
            "passes_to_1pct_failure": life["passes_to_1pct_failure"],
            "baseline_passes_to_first_failure": bfirst,
            "baseline_passes_to_1pct_failure": blife["passes_to_1pct_failure"] if blife else None,
            # how much longer the first cell lives than in the baseline (None: one never wears)
            "lifetime_gain": (_json_ratio(_ratio(first, bfirst))
                              if first is not None and bfirst is not None else None),
            "set_energy_per_pass_j": cost["set_energy_j"],
            "reset_energy_per_pass_j": cost["reset_energy_j"],
            "write_energy_per_pass_j": cost["write_energy_j"],
            "write_time_per_pass_s": cost["write_time_s"],
            "baseline_write_energy_per_pass_j": bcost["write_energy_j"] if bcost else None,
            "baseline_write_time_per_pass_s": bcost["write_time_s"] if bcost else None,
            # one input vector through every tile once: the read side of an inference
            "mvm_read_energy_j": r.tiles * self.device.read_energy_j,
        }

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
                    "writes_per_pass", "baseline_writes_per_pass", "reduction",
                    "max_cell_writes_per_pass", "p99_cell_writes_per_pass",
                    "passes_to_first_failure", "device"])
        d = self.to_dict()
        xbar = f"{self.result.config.rows}x{self.result.config.cols}"
        dev = self.device.name
        blank = lambda v: "" if v is None else v  # noqa: E731
        for l in d["layers"]:
            base = l.get("baseline_writes_per_pass")
            red = (base / l["writes_per_pass"]) if base is not None and l["writes_per_pass"] else ""
            w.writerow([l["name"], "x".join(map(str, l["shape"])), xbar, l["tiles"],
                        l["initial_writes"], l["writes_per_pass"], blank(base),
                        f"{red:.4f}" if red != "" else "", blank(l["max_cell_writes_per_pass"]),
                        blank(l["p99_cell_writes_per_pass"]), blank(l["passes_to_first_failure"]),
                        dev])
        red = d["reduction"]
        w.writerow(["TOTAL", "", xbar, d["tiles"], d["initial_writes"], d["writes_per_pass"],
                    blank(d["baseline_writes_per_pass"]),
                    f"{red:.4f}" if isinstance(red, float) else (red or ""),
                    d["max_cell_writes_per_pass"], d["cell_writes_per_pass"]["p99"],
                    blank(d["passes_to_first_failure"]), dev])
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

        fmt = format_count
        if d["period_passes"] > 1:
            lines.append(f"wear_leveling={cfg.wear_leveling}: the mapping shifts every pass; "
                         f"counts per pass are averages over a period of {d['period_passes']} "
                         "passes")
            lines.append("")
        row("initial programming writes", fmt(d["initial_writes"]))
        row("writes per pass", fmt(d["writes_per_pass"]))
        row("  SET / RESET", f"{fmt(d['set_writes_per_pass'])} / "
            f"{fmt(d['reset_writes_per_pass'])}")
        row("  pulses (SET / RESET)", f"{fmt(d['set_pulses_per_pass'])} / "
            f"{fmt(d['reset_pulses_per_pass'])}")
        row("  rows programmed", fmt(d["rows_programmed_per_pass"]))
        if self.baseline is not None:
            row("baseline writes per pass", fmt(d["baseline_writes_per_pass"]))
            red = d["reduction"]
            row("reduction (baseline / this)", f"{red:.3f}x" if isinstance(red, float) else str(red))
        lines.append("")
        dev = self.device
        cw = d["cell_writes_per_pass"]
        lines.append(f"  wear and cost on device {dev.name!r}, endurance {dev.endurance:.3g} "
                     "writes per cell")
        lines.append(f"  ({dev.description})")
        row("worn cells (written in a pass)", f"{cw['worn_cells']:,} of {cw['cells']:,}")
        row("cell writes per pass p50/p99/max",
            f"{fmt(cw['p50'])} / {fmt(cw['p99'])} / {fmt(cw['max'])}")
        if self.result.config.pool > 1:
            xm = d["crossbar_max_cell_writes_per_pass"]
            row("  max by crossbar (min .. max)", f"{fmt(min(xm))} .. {fmt(max(xm))}")
        row("passes to first cell failure", fmt(d["passes_to_first_failure"]))
        if self.baseline is not None:
            row("  baseline", fmt(d["baseline_passes_to_first_failure"]))
            gain = d["lifetime_gain"]
            row("  lifetime gain (this / baseline)",
                f"{gain:.3f}x" if isinstance(gain, float) else str(gain))
        row("passes to 1% of cells failing", fmt(d["passes_to_1pct_failure"]))
        e, t = d["write_energy_per_pass_j"], d["write_time_per_pass_s"]
        row("write energy per pass", si(e, "J"))
        row("  SET / RESET", f"{si(d['set_energy_per_pass_j'], 'J')} / "
            f"{si(d['reset_energy_per_pass_j'], 'J')}")
        row("write time per pass", si(t, "s"))
        if self.baseline is not None:
            be, bt = d["baseline_write_energy_per_pass_j"], d["baseline_write_time_per_pass_s"]
            row("baseline write energy / time", f"{si(be, 'J')} / {si(bt, 's')}")
            er, tr = _ratio(be, e), _ratio(bt, t)
            row("  saved (baseline / this)",
                f"{er:.3f}x / {tr:.3f}x" if er is not None and tr is not None else "-")

        lines.append("")
        lines.append("  writes per pass by slice (0 = least significant)")
        base_sl = d["baseline_per_slice"] or {}
        for s, v in d["per_slice"].items():
            extra = f"   baseline {fmt(base_sl[s]):>14}" if s in base_sl else ""
            lines.append(f"    slice {s:>2}: {fmt(v):>14}{extra}")
        lines.append("")
        lines.append(f"  {'layer':<40}{'tiles':>8}{'writes/pass':>14}{'max/cell':>10}"
                     + (f"{'baseline':>14}{'reduction':>10}" if self.baseline else "")
                     + "  tile order (ids s*blocks+j; a-b = a run)")
        for l in d["layers"]:
            s = (f"  {l['name'][:40]:<40}{l['tiles']:>8,}{fmt(l['writes_per_pass']):>14}"
                 f"{fmt(l['max_cell_writes_per_pass']):>10}")
            if self.baseline is not None:
                b = l["baseline_writes_per_pass"]
                r = f"{b / l['writes_per_pass']:.2f}x" if l["writes_per_pass"] else "-"
                s += f"{fmt(b):>14}{r:>10}"
            lines.append(s + "  " + format_order(l["tile_order"], width=60))
        return "\n".join(lines)

    def __repr__(self) -> str:
        red = self.reduction
        return (f"ReprogramReport(writes_per_pass={self.writes_per_pass}, "
                f"reduction={red if red is None else round(red, 4)})")


def reprogram_report(model: nn.Module, config: CrossbarConfig | None = None, *,
                     baseline: bool = True, progress: bool = False,
                     model_name: str | None = None, reuse: bool = True,
                     device: Device | str | None = None) -> ReprogramReport:
    """Count the writes of programming ``model`` (its current weights, fixed sort index and
    stuck cells) and of the baseline. Pure: the model is not changed. With ``reuse``, the
    counts of the model's last programming are taken as they are when nothing it depends on
    has changed since (same numbers, one programming fewer); ``reuse=False`` always counts.

    ``config`` may differ from the layers' in ``wear_leveling`` and ``device`` only (they
    change the counting, not the cells). ``device`` (a preset name, a YAML path or a
    :class:`Device`) overrides the configuration's device for lifetime and cost."""
    from .nn.modules import crossbar_layers
    if not crossbar_layers(model):
        from .nn.record import no_crossbar_layers
        raise no_crossbar_layers(model, "reprogram_report")
    result = last_program(model, config) if reuse else None
    if result is None:
        result = program_model(model, config, progress=progress)
    base = program_model(model, config, baseline=True, progress=progress) if baseline else None
    return ReprogramReport(result, base, model_name=model_name, device=device)
