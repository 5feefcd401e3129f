"""The library entry points: :func:`finetune` (one call), :func:`save_final` and
:func:`load_finetuned` (the final checkpoint format ``{"model", "crossbar_config",
"model_name"}``)."""
from __future__ import annotations

import inspect
import json
import os
import time
from typing import Callable, Optional

import torch.nn as nn

from ...config import CrossbarConfig, atomic_write_text
from ...errors import UserInputError
from ...nn.modules import crossbar_layers
from .args import FinetuneArgs, FinetuneResult
from .checkpoint import atomic_torch_save, crossbar_fingerprint, derived_keys, unwrap
from .trainer import Trainer


def finetune(model: nn.Module, dataset, *, teacher: Optional[nn.Module] = None,
             resume=None, device="cpu", model_name=None, config=None, collate_fn=None,
             stop_after: Optional[int] = None, **kwargs) -> FinetuneResult:
    """Fine-tune ``model`` (converted, stuck cells in place) on ``dataset``, then reprogram it.

    ``kwargs`` are :class:`FinetuneArgs` fields. Returns a :class:`FinetuneResult` whose
    ``program`` holds the new reprogram counts; the model is left in eval mode, programmed
    with its fine-tuned weights.
    """
    args = FinetuneArgs(**kwargs)
    tr = Trainer(model, dataset, args, teacher=teacher, config=config, model_name=model_name,
                 device=device, collate_fn=collate_fn)
    return tr.fit(resume, stop_after=stop_after)


def save_final(model: nn.Module, path, *, config: Optional[CrossbarConfig] = None,
               model_name: Optional[str] = None, extra: Optional[dict] = None) -> None:
    """Write ``{"model": state_dict, "crossbar_config": cfg.to_dict(), "model_name": name}``
    atomically (``extra`` entries are added; they must be plain data)."""
    model = unwrap(model)
    if config is None:
        config = crossbar_layers(model)[0][1].config
    obj = {"model": model.state_dict(),
           "crossbar_config": config.with_device_values().to_dict(),  # values, not a path
           "model_name": model_name}
    if extra:
        obj.update(extra)
    atomic_torch_save(obj, path)


def write_final(model: nn.Module, out_dir, result: dict, started: float, log, *,
                config: CrossbarConfig, model_name: str) -> str:
    """The end of a fine-tuning run: ``final.pt`` (:func:`save_final`) and ``result.json``
    (``result`` with the checkpoint's path and the run's seconds), both written atomically.
    Returns the checkpoint's path."""
    final = os.path.join(out_dir, "final.pt")
    save_final(model, final, config=config, model_name=model_name)
    result["final_checkpoint"] = final
    result["seconds"] = time.time() - started
    atomic_write_text(os.path.join(out_dir, "result.json"),
                      json.dumps(result, indent=2, default=str) + "\n")
    log(f"wrote {final} and {os.path.join(out_dir, 'result.json')}")
    return final


def load_finetuned(path, model_builder: Callable[..., nn.Module], *, map_location="cpu"):
    """Load a fine-tuned checkpoint: ``model_builder()`` (or ``model_builder(model_name)`` if
    it takes an argument) builds the float model, which is converted with the saved config
    (without programming: the saved buffers hold what the crossbars hold) and given the saved
    state dict. Returns the converted model in eval mode.

    Also accepts training checkpoints (``checkpoint-<step>.pt``), which leave out the derived
    crossbar buffers: then ``model_builder`` must give the *original* float weights (the ones
    the run converted); they are converted and programmed, checked against the checkpoint's
    fingerprint, given the checkpoint's latent weights and reprogrammed (stuck cells keep
    their levels), i.e. the model as it would be deployed had training stopped at that step."""
    from ...nn.conversion import convert
    from ...programming import reprogram
    from ..checkpoint import read_checkpoint
    ck = read_checkpoint(path, "checkpoint")
    if not isinstance(ck, dict) or "model" not in ck or "crossbar_config" not in ck:
        raise UserInputError(f"{os.fspath(path)!r}: not a fine-tuned crossbar checkpoint (expected "
                             "keys 'model' and 'crossbar_config')")
    cfg = CrossbarConfig.from_dict(ck["crossbar_config"])
    try:
        takes_arg = len(inspect.signature(model_builder).parameters) > 0
    except (TypeError, ValueError):
        takes_arg = False
    base = model_builder(ck.get("model_name")) if takes_arg else model_builder()
    if "crossbar_fingerprint" in ck:  # a training checkpoint: rebuild the derived buffers
        xmodel = convert(base, cfg)
        if crossbar_fingerprint(xmodel) != ck["crossbar_fingerprint"]:
            raise UserInputError(f"{os.fspath(path)!r} is a training checkpoint whose crossbars "
                                 "cannot be rebuilt from these weights: the builder must give the "
                                 "float weights the run converted (or load the run's final.pt)")
        missing, unexpected = xmodel.load_state_dict(ck["model"], strict=False)
        bad = sorted(set(missing) - set(derived_keys(xmodel)))
        if bad or unexpected:
            raise UserInputError(f"{os.fspath(path)!r} does not fit the model: missing {bad[:5]}, "
                                 f"unexpected {sorted(unexpected)[:5]}")
        reprogram(xmodel)
    else:
        xmodel = convert(base, cfg, program=False)
        xmodel.load_state_dict(ck["model"])
    return xmodel.to(map_location).eval()
