"""Reading a user's checkpoint file and fitting its state dict to a model, with errors that
name the file and what does not fit (``WeightLoadError``, a user error)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..errors import UserInputError


class WeightLoadError(UserInputError, RuntimeError):
    """A checkpoint cannot be read, or does not fit the model it is loaded into (a user error:
    scripts print it as one line)."""


def read_checkpoint(path, what: str = "checkpoint"):
    """``torch.load(path, weights_only=True)`` on the CPU, with errors that name the file:
    ``FileNotFoundError`` / ``IsADirectoryError`` for a missing path or a folder, and
    :class:`WeightLoadError` for a file that is not a (complete) PyTorch checkpoint: random
    bytes, a truncated archive, or pickled objects other than tensors and plain containers."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {str(p)!r}")
    if p.is_dir():
        raise IsADirectoryError(f"{what} {str(p)!r} is a folder, not a file")
    with warnings.catch_warnings(record=True) as caught:  # (random bytes make torch warn
        warnings.simplefilter("always")                   # about a pickle protocol first)
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises IndexError, EOFError, RuntimeError, Unpickling...
            raise WeightLoadError(
                f"{what} {str(p)!r} cannot be read: {_why_unreadable(p, e)}") from e
    for w in caught:  # a file that loads: pass its warnings on
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return obj


def _why_unreadable(path: Path, e: BaseException) -> str:
    import pickle
    import zipfile
    msg = " ".join(str(e).split())
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        return (f"truncated or damaged zip archive ({size:,} bytes; the end of the file is "
                "missing): write it again")
    if isinstance(e, pickle.UnpicklingError) and "Unsupported global" in msg:
        import re
        g = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
        return ("it holds Python objects other than tensors and plain containers"
                + (f" ({g.group(1)})" if g else "") + ", which are not loaded "
                "(weights_only=True) for safety; save a state dict")
    if head == b"PK\x03\x04":
        return f"damaged PyTorch archive ({type(e).__name__}: {msg[:200]})"
    return ("not a PyTorch checkpoint (neither a torch.save zip archive nor a legacy pickle; "
            f"{size:,} bytes)")


def state_dict_mismatch(model_sd: dict, sd: dict, show: int = 3) -> "str | None":
    """One line describing how ``sd`` fails to fit ``model_sd`` (missing / unexpected keys,
    shape mismatches, a few of each), or None when it fits."""
    missing = [k for k in model_sd if k not in sd]
    unexpected = [k for k in sd if k not in model_sd]
    shapes = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in model_sd.items()
              if k in sd and isinstance(v, torch.Tensor) and isinstance(sd[k], torch.Tensor)
              and tuple(sd[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or shapes):
        return None

    def some(items):
        return ", ".join(items[:show]) + (f", ... ({len(items)} in all)" if len(items) > show
                                          else "")
    parts = []
    if missing:
        parts.append(f"{len(missing)} model key(s) missing from it ({some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} key(s) the model lacks ({some(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es) ("
                     + some([f"{k}: {list(a)} in the file, {list(b)} in the model"
                             for k, a, b in shapes]) + ")")
    return "; ".join(parts)


def _extract_state_dict(obj, path) -> dict:
    if isinstance(obj, nn.Module):  # not reachable with weights_only=True, kept for clarity
        return obj.state_dict()
    if not isinstance(obj, dict):
        raise WeightLoadError(f"{path}: expected a state dict, got {type(obj).__name__}")
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)][:5]
        raise WeightLoadError(
            f"{path}: not a state dict (non-tensor entries {bad}); expected a plain state dict "
            "or a dict with a 'state_dict' or 'model' key"
        )
    # DataParallel / DDP checkpoints
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_checkpoint_into(model: nn.Module, checkpoint, name: Optional[str] = None) -> None:
    path = Path(checkpoint)
    obj = read_checkpoint(path)
    if isinstance(obj, dict) and "crossbar_config" in obj:
        raise WeightLoadError(
            f"{path} is a crossbar checkpoint (scripts/finetune.py): load it into a converted "
            "model with crossbar_torch.apps.finetune.load_finetuned(path, builder), or pass it to "
            "scripts/eval_imagenet.py --checkpoint")
    sd = _extract_state_dict(obj, path)
    what = name or type(model).__name__
    why = state_dict_mismatch(model.state_dict(), sd)
    if why:
        raise WeightLoadError(f"checkpoint {str(path)!r} does not fit {what} (another "
                              f"architecture?): {why}")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise WeightLoadError(f"checkpoint {str(path)!r} does not fit {what}: "
                              f"{' '.join(str(e).split())[:500]}") from e
