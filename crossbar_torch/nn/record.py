"""What ``convert`` did to a model (:class:`ConversionRecord`, kept as
``model.crossbar_conversion``), and the error of a call on a model without crossbar layers,
which tells a model that ``convert`` found nothing in apart from one never converted."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from ..errors import ModelStateError


@dataclass
class ConversionRecord:
    converted: list = field(default_factory=list)   # module names
    skipped: list = field(default_factory=list)     # (name, type name, reason)

    def summary(self) -> str:
        lines = [f"converted {len(self.converted)} layer(s) to crossbars"]
        if self.skipped:
            lines.append(f"left {len(self.skipped)} layer(s) alone:")
            lines += [f"  {n} ({t}): {r}" for n, t, r in self.skipped]
        return "\n".join(lines)


def _why_none(record: ConversionRecord) -> str:
    """Why a conversion converted nothing, from its record."""
    if not record.skipped:
        return "the model has no nn.Linear / nn.Conv2d layer"
    reasons = sorted({r for _, _, r in record.skipped})
    if set(reasons) <= {"not matched by include", "matched by exclude"}:
        return "include / exclude leave no nn.Linear / nn.Conv2d layer"
    return f"every nn.Linear / nn.Conv2d layer was left alone ({'; '.join(reasons)})"


def no_crossbar_layers(model: nn.Module, what: str) -> ModelStateError:
    """The error of ``what`` (an API call) given a model without crossbar layers: a model that
    ``convert`` found nothing in is told apart from one never converted."""
    record = getattr(model, "crossbar_conversion", None)
    if isinstance(record, ConversionRecord) and not record.converted:
        return ModelStateError(f"{what}: the model has no crossbar layers: convert() converted none "
                          f"({_why_none(record)})")
    return ModelStateError(f"{what}: the model has no crossbar layers: convert it first "
                      "(crossbar_torch.convert)")
