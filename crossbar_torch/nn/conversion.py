"""convert(): the model-rewriting pass that swaps nn.Linear / nn.Conv2d for crossbar layers.

Replacement is ``isinstance``-based. Subclasses are converted when their forward is known:
timm's ``Conv2dSame`` (dynamic 'same' padding), ``StdConv2d`` / ``ScaledStdConv2d`` (and their
``Same`` variants: the crossbar holds the standardized weight the layer really uses) and
``timm.layers.Linear``; any other subclass that overrides ``forward`` is left alone and listed,
because its forward may use the weight in ways a crossbar layer cannot reproduce. Everything
left alone is recorded with its reason in ``model.crossbar_conversion``.
"""
from __future__ import annotations

import copy
import fnmatch
import warnings

import torch.nn as nn

from ..config import CrossbarConfig
from ..errors import ModelStateError
from ..heap import release_free_memory
from .record import ConversionRecord, _why_none
from .modules import CROSSBAR_LAYERS, CrossbarConv2d, CrossbarLinear


def _timm_classes():
    try:
        from timm.layers import (Conv2dSame, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d,
                                 StdConv2dSame)
        from timm.layers.linear import Linear as TimmLinear
    except ImportError:  # timm absent: only plain torch layers are known
        return {}, ()
    # class -> (dynamic_same_pad, standardize, scaled)
    convs = {Conv2dSame: (True, False, False), StdConv2d: (False, True, False),
             StdConv2dSame: (True, True, False), ScaledStdConv2d: (False, True, True),
             ScaledStdConv2dSame: (True, True, True)}
    return convs, (TimmLinear,)


def _matches(name: str, patterns) -> bool:
    if patterns is None:
        return False
    if callable(patterns):
        return bool(patterns(name))
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _convert_one(name, module, parent, config, known_convs, known_linears, encode):
    """Return (new_module, None) or (None, reason)."""
    if isinstance(module, nn.Linear):
        if isinstance(parent, nn.MultiheadAttention):
            return None, "owned by nn.MultiheadAttention, which reads its weight directly"
        if type(module) is not nn.Linear and type(module) not in known_linears \
                and type(module).forward is not nn.Linear.forward:
            return None, f"subclass {type(module).__name__} overrides forward"
        return CrossbarLinear.from_linear(module, config, encode), None
    if isinstance(module, nn.Conv2d):
        if type(module) in known_convs:
            same, std, scaled = known_convs[type(module)]
            kw = {"dynamic_same_pad": same}
            if std:
                kw["std_eps"] = float(module.eps)
                if scaled:
                    kw.update(std_gain=True, std_scale=float(module.scale))
            return CrossbarConv2d.from_conv(module, config, encode=encode, **kw), None
        if type(module) is not nn.Conv2d and type(module).forward is not nn.Conv2d.forward:
            return None, f"subclass {type(module).__name__} overrides forward"
        return CrossbarConv2d.from_conv(module, config, encode=encode), None
    return None, None


def convert(model: nn.Module, config: CrossbarConfig | None = None, *, include=None,
            exclude=None, inplace: bool = False, program: bool = True,
            progress: bool = False) -> nn.Module:
    """Replace the Linear / Conv2d layers of ``model`` by crossbar layers and program them.

    ``include`` / ``exclude``: glob patterns (or a list of them, or a predicate) on module
    names; with ``include`` only matching layers are converted. Returns a new model unless
    ``inplace``. With ``program`` (default) the whole model is programmed onto the crossbar
    pool (rules 5 to 9), so stuck cells are in place before the first forward.
    The record of what was converted and what was left alone (and why) is
    ``model.crossbar_conversion``.
    """
    config = config or CrossbarConfig()
    if not isinstance(config, CrossbarConfig):
        raise TypeError(f"config must be a CrossbarConfig, got {type(config).__name__}")
    from ..config import ignored_settings
    for why in ignored_settings(config):  # accepted, but said
        warnings.warn(f"convert: {why}", UserWarning, stacklevel=2)
    kinds = [k.strip() for k in config.tuned_on.split(",") if k.strip()]
    if kinds and type(model).__name__ not in kinds:
        warnings.warn(f"convert: this config was tuned on {', '.join(kinds)}, and the model is "
                      f"a {type(model).__name__}: a stucking setting that is safe on one model "
                      "can destroy another (docs/transformers.md); measure its fidelity before "
                      "trusting it", UserWarning, stacklevel=2)
    if not inplace:
        model = copy.deepcopy(model)
    known_convs, known_linears = _timm_classes()
    record = ConversionRecord()
    modules = list(model.named_modules())
    parents = {}
    for name, mod in modules:
        for child_name, child in mod.named_children():
            parents[f"{name}.{child_name}" if name else child_name] = (mod, child_name)
    from tqdm.auto import tqdm
    for name, mod in tqdm(modules, desc="convert", disable=not progress, leave=False):
        if isinstance(mod, CROSSBAR_LAYERS):
            if mod.config != config:
                # its scales, sort index, placement and stuck cells belong to its own config:
                # silently keeping them would label one configuration's numbers as another's
                diff = mod.config.diff(config)
                raise ModelStateError(
                    f"convert: {name or type(mod).__name__} is already a crossbar layer, "
                    f"converted with another config (field: (its, asked)) {diff}; convert the "
                    "original float model with the new config instead")
            record.converted.append(name)
            continue
        if isinstance(mod, nn.MultiheadAttention):
            record.skipped.append((name, type(mod).__name__, "its in_proj_weight / out_proj are "
                                   "used directly by F.multi_head_attention_forward"))
            continue
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            if isinstance(mod, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                                nn.ConvTranspose3d, nn.Bilinear)):
                record.skipped.append((name, type(mod).__name__, "layer type not supported"))
            continue
        if include is not None and not _matches(name, include):
            record.skipped.append((name, type(mod).__name__, "not matched by include"))
            continue
        if _matches(name, exclude):
            record.skipped.append((name, type(mod).__name__, "matched by exclude"))
            continue
        if isinstance(mod, nn.modules.lazy.LazyModuleMixin) and mod.has_uninitialized_params():
            record.skipped.append((name, type(mod).__name__, "lazy module not initialized yet "
                                   "(run one forward before converting)"))
            continue
        if mod.weight.is_meta:
            raise ModelStateError(f"convert: {name or type(mod).__name__} has its weight on the meta "
                             "device; load real weights before converting")
        parent, attr = parents.get(name, (None, None))
        try:
            new, reason = _convert_one(name, mod, parent, config, known_convs, known_linears,
                                       encode=not program)
        except (ValueError, TypeError) as e:  # e.g. NaN weights: say which layer
            raise type(e)(f"convert: layer {name or type(mod).__name__}: {e}") from None
        # its sort's transients, about 16 bytes a weight (crossbar_torch/heap.py)
        release_free_memory(16 * mod.weight.numel())
        if new is None:
            record.skipped.append((name, type(mod).__name__, reason))
            continue
        if parent is None:  # the model itself is a single layer
            model = new
        else:
            setattr(parent, attr, new)
        record.converted.append(name)
    unexpected = [s for s in record.skipped if s[2] not in ("not matched by include",
                                                             "matched by exclude")]
    if unexpected:
        warnings.warn("convert: left alone " + "; ".join(f"{n} ({t}): {r}"
                                                         for n, t, r in unexpected))
    if not record.converted:
        warnings.warn(f"convert: no layer was converted: {_why_none(record)}; the model "
                      "computes in float and has nothing to program or count")
    object.__setattr__(model, "crossbar_conversion", record)
    from .modules import crossbar_layers
    layers = crossbar_layers(model)
    for number, (name, layer) in enumerate(layers):
        layer.layer_number, layer.layer_name = number, name  # rule 19's read-noise draws
    from ..config import unmatched_patterns
    missing = unmatched_patterns(config, [name for name, _ in layers]) if layers else []
    if missing:  # rule 22: a policy that applies nowhere is a mistake (a typo, another model)
        from ..errors import ConfigError
        raise ConfigError(f"layer_overrides pattern(s) {missing} match no crossbar layer of this "
                          f"model (its layers: {layers[0][0]!r} ... {layers[-1][0]!r})")
    if program and record.converted:
        from ..programming import reprogram
        reprogram(model, progress=progress)
    return model
