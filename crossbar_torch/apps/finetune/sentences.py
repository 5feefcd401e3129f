"""Fine-tuning of sentence models (MiniLM-L6, all-mpnet-base-v2) by distillation from the float
model: the crossbar model's sentence embeddings are pulled towards the float model's
(:func:`~crossbar_torch.apps.finetune.losses.embedding_loss`). It is the image path's
:class:`~crossbar_torch.apps.finetune.trainer.Trainer` unchanged (the sort index, the placement
and the stuck cells stay as converted; train mode simulates programming with the stuck cells
kept), given

* :class:`SentenceDataset`: items ``(sentence, -1)``;
* :class:`TokenCollate`: a batch of sentences as the model's token tensors (a dict);
* :class:`SentenceEmbedder`: wraps the model so that ``embedder(tokens)`` is the normalized
  sentence embedding ``(batch, d)``, as sentence-transformers computes it.

The training sentences should not be the ones the model is evaluated on: the scripts default
to the generated sentences of :func:`crossbar_torch.apps.frontier.frontier_sentences` (the
first :data:`TRAIN_SENTENCES`, none of which rule 21's calibration uses), never the packaged
real corpus (the evaluation set).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from ...errors import UserInputError

TRAIN_SENTENCES = 1024  # frontier_sentences(1024): disjoint from feedback_sentences()


def default_train_sentences(n: int = TRAIN_SENTENCES) -> List[str]:
    """The generated sentences fine-tuning uses by default (never the real corpus)."""
    from ..frontier import frontier_sentences
    return frontier_sentences(n)


def is_sentence_transformer(model: nn.Module) -> bool:
    return any(c.__name__ == "SentenceTransformer" for c in type(model).__mro__)


class SentenceDataset(torch.utils.data.Dataset):
    """Sentences as training items ``(sentence, -1)`` (no label: distillation only)."""

    def __init__(self, sentences: Sequence[str]):
        self.sentences = [str(s) for s in sentences]
        if not self.sentences:
            raise UserInputError("no training sentences")

    def __len__(self) -> int:
        return len(self.sentences)

    def __getitem__(self, i):
        return self.sentences[i], -1


class TokenCollate:
    """``collate_fn``: a list of ``(sentence, label)`` as ``(tokens, labels)``, ``tokens`` the
    dict the model takes (``input_ids``, ``attention_mask``, ...). For a MiniLM
    (:class:`~crossbar_torch.apps.models.minilm.MiniLM`) the package's tokenizer, for a
    ``SentenceTransformer`` its own ``tokenize``. A plain class (not a closure): DataLoader
    workers can pickle it."""

    def __init__(self, model: nn.Module, max_length: int = 128):
        self.st = model if is_sentence_transformer(model) else None
        self.max_length = max_length
        self._tok = None

    def tokens(self, sentences: List[str]) -> dict:
        if self.st is not None:
            # ``preprocess`` since sentence-transformers 5.x (``tokenize`` warns there)
            return dict(getattr(self.st, "preprocess", self.st.tokenize)(sentences))
        if self._tok is None:
            from ..models.minilm import minilm_tokenizer
            self._tok = minilm_tokenizer(self.max_length)
        enc = self._tok.encode_batch(sentences)
        return {"input_ids": torch.tensor([e.ids for e in enc], dtype=torch.long),
                "attention_mask": torch.tensor([e.attention_mask for e in enc], dtype=torch.long),
                "token_type_ids": torch.tensor([e.type_ids for e in enc], dtype=torch.long)}

    def __getstate__(self):
        return {**self.__dict__, "_tok": None}  # the tokenizer is rebuilt in the worker

    def __call__(self, items):
        sentences = [s for s, _ in items]
        labels = torch.as_tensor([int(y) for _, y in items], dtype=torch.long)
        return self.tokens(sentences), labels


class SentenceEmbedder(nn.Module):
    """``forward(tokens) -> (batch, d)``: the normalized sentence embedding of ``model`` (a
    MiniLM: masked mean of the last hidden state, L2-normalized; a ``SentenceTransformer``:
    its own modules, Transformer -> Pooling -> Normalize). The crossbar layers stay those of
    ``model`` (names prefixed ``model.``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.st = is_sentence_transformer(model)

    def forward(self, tokens: dict) -> torch.Tensor:
        if self.st:
            return self.model(dict(tokens))["sentence_embedding"]
        from ..models.minilm import mean_pooled_embedding
        hidden = self.model(tokens["input_ids"], tokens.get("attention_mask"),
                            tokens.get("token_type_ids"))
        return mean_pooled_embedding(hidden, tokens.get("attention_mask"))


def finetune_sentences(model: nn.Module, teacher: nn.Module, sentences: Optional[Sequence[str]] = None,
                       *, device="cpu", max_length: int = 128, model_name=None, config=None,
                       log=None, stop_after: Optional[int] = None, **kwargs):
    """Distil ``teacher`` (the float sentence model) into ``model`` (its converted copy) on
    ``sentences`` (default :func:`default_train_sentences`), then reprogram ``model``.

    ``kwargs`` are :class:`~crossbar_torch.apps.finetune.args.FinetuneArgs` fields; ``loss``
    defaults to ``"cosine"`` (``"mse"`` the other choice). Returns the
    :class:`~crossbar_torch.apps.finetune.args.FinetuneResult`; ``model`` is left in eval mode,
    programmed with its fine-tuned weights."""
    from .args import FinetuneArgs
    from .losses import EMBEDDING_LOSSES
    from .trainer import Trainer
    kwargs.setdefault("loss", "cosine")
    if kwargs["loss"] not in EMBEDDING_LOSSES:
        raise UserInputError(f"loss {kwargs['loss']!r}: a sentence model distils embeddings; "
                             f"use one of {', '.join(EMBEDDING_LOSSES)}")
    kwargs.setdefault("freeze_bn", False)  # no BatchNorm in a transformer
    kwargs.setdefault("freeze_dropout", True)  # the teacher has none: match it
    args = FinetuneArgs(**kwargs)
    data = SentenceDataset(default_train_sentences() if sentences is None else sentences)
    tr = Trainer(SentenceEmbedder(model), data, args, teacher=SentenceEmbedder(teacher),
                 config=config, model_name=model_name, device=device, log=log,
                 collate_fn=TokenCollate(model, max_length))
    return tr.fit(stop_after=stop_after)
