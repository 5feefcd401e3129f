"""The scorers of a frontier row: :class:`ImageScorer` (top-1 / top-5, agreement with the float
model, the per-image record of the paired drop) and :class:`SentenceScorer` (fidelity of the
sentence embeddings). Each scores the float model once (:meth:`reference`, kept on disk by
:class:`FloatCache`) and then every converted model (:meth:`score`); under ``torchrun`` each
rank scores its batches and the parts are gathered in batch order (:mod:`.shard`)."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn

from ...config import atomic_write
from ..evaluate import topk_correct
from .errors import FrontierError
from .metrics import decode_bits, embedding_fidelity, encode_bits, paired_top1_drop
from .sentences import CALIBRATION_SENTENCES, GAIN_SENTENCES, feedback_sentences
from .shard import broadcast, gather, rank_world

CALIBRATION_IMAGES = 8       # images that set the analog ranges (rule 20)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class FloatCache:
    """The float model's outputs kept beside the CSV (``<csv>.float.pt``), keyed by a hash of
    what they depend on (model, weights, data, preprocessing), so a resumed run does not
    recompute them. Rank 0 reads and writes the file; every rank gets what it read."""

    def __init__(self, path: Optional[str], key: Optional[dict]):
        self.path = path
        self.key = _hash(key) if key is not None else None

    def load(self, fields: Sequence[str]) -> Optional[dict]:
        """The saved outputs (a dict holding ``fields``), or None: no file, another key, an
        older layout or an unreadable file (recomputed then)."""
        saved = None
        if rank_world()[0] == 0 and self.path and self.key and os.path.isfile(self.path):
            try:
                saved = torch.load(self.path, map_location="cpu", weights_only=True)
            except Exception:  # unreadable cache: recompute
                saved = None
            if not (isinstance(saved, dict) and saved.get("key") == self.key
                    and all(f in saved for f in fields)):
                saved = None
        return broadcast(saved)

    def save(self, outputs: dict) -> None:
        if rank_world()[0] == 0 and self.path and self.key:
            atomic_write(self.path, lambda f: torch.save({"key": self.key, **outputs}, f),
                         binary=True)


class ImageScorer:
    """Top-1 / top-5 on labelled images and top-1 agreement with the float model.

    ``loader`` yields ``(images, labels[, indices])`` or :class:`~crossbar_torch.apps.data.Batch`
    (``collate_skip_bad``); under ``torchrun`` it must be this rank's share
    (:func:`~crossbar_torch.apps.frontier.shard.shard_loader`). With ``cache`` the preprocessed
    batches are kept in memory after the first pass (``len(dataset) * 3 * H * W`` floats), else
    every row reads the images again. ``on_bad(record)`` is called once for each unreadable
    image, on every rank, in data order, after the first pass (default: raise).
    """

    kind = "image"
    primary = "top1"
    drop = "top1_drop"
    metrics = (("top1", float), ("top5", float), ("top1_agreement", float),
               ("top1_drop", float), ("top1_drop_ci_low", float), ("top1_drop_ci_high", float),
               ("top1_lost", int), ("top1_gained", int), ("images", int),
               ("top1_correct", int), ("top5_correct", int), ("agreement_count", int),
               ("top1_bits", str))
    RECORD = ("argmax", "top1", "top5", "labels")  # per image, in data order

    def __init__(self, loader, device="cpu", *, cache: bool = True, on_bad=None,
                 key: Optional[dict] = None, calib_images: int = CALIBRATION_IMAGES):
        if isinstance(calib_images, bool) or not isinstance(calib_images, int) or \
                calib_images < 1:
            raise ValueError(f"ImageScorer: calib_images must be an integer >= 1, got "
                             f"{calib_images!r}")
        self.calib_images = calib_images
        self.loader = loader
        self.device = torch.device(device)
        self.cache = cache
        self.on_bad = on_bad
        self.key = key
        self._batches: Optional[list] = None
        self.ref: Optional[dict] = None  # the float model's per-image record
        self._bad_reported = False

    def _batch_numbers(self):
        """The global number of each batch the loader yields: the shard's, or 0, 1, ..."""
        shard = getattr(self.loader, "batch_sampler", None)
        numbers = getattr(shard, "batch_numbers", None)
        if numbers is None and rank_world()[1] > 1:
            raise ValueError("ImageScorer under torchrun: the loader must yield this rank's "
                             "batches (frontier.shard.shard_loader), or every rank scores "
                             "every image")
        return iter(numbers) if numbers is not None else iter(range(1 << 62))

    def _iter(self, bad: Optional[list] = None):
        """(batch number, images, labels) of this rank's readable images; unreadable ones go
        to ``bad`` (or raise without ``on_bad``)."""
        if self._batches is not None:
            yield from self._batches
            return
        from ..data import Batch, UnreadableImageError
        keep = [] if self.cache else None
        for number, batch in zip(self._batch_numbers(), self.loader):
            if isinstance(batch, Batch):
                x, y, bad_here = batch.images, batch.labels, batch.bad
            else:
                x, y, bad_here = batch[0], batch[1], []
            for b in bad_here:
                if self.on_bad is None:
                    raise UnreadableImageError(b.path, b.reason)
                if bad is not None:
                    bad.append((number, b))
            if x is None or not x.shape[0]:
                continue
            if keep is not None:
                keep.append((number, x, y))
            yield number, x, y
        if keep is not None:
            self._batches = keep

    @torch.no_grad()
    def _record(self, model: nn.Module) -> dict:
        """The per-image record of ``model`` (:attr:`RECORD`, data order) over every rank's
        images; the first pass also reports the unreadable images (``on_bad``)."""
        model.eval()
        parts, bad, error = [], [], None
        try:
            for number, x, y in self._iter(bad if not self._bad_reported else None):
                logits = model(x.to(self.device)).float()
                parts.append((number, {"argmax": logits.argmax(-1).cpu(),
                                       "top1": topk_correct(logits, y, 1).cpu(),
                                       "top5": topk_correct(logits, y, 5).cpu(),
                                       "labels": y.cpu()}))
        except Exception as e:  # shared with the other ranks, then raised on all
            error = e
        gathered = gather((parts, bad), error)
        parts = sorted((p for ps, _ in gathered for p in ps), key=lambda p: p[0])
        if not self._bad_reported:
            for _, b in sorted((b for _, bs in gathered for b in bs), key=lambda b: b[0]):
                self.on_bad(b)
            self._bad_reported = True
        if not parts:
            raise FrontierError("no readable images to evaluate")
        return {k: torch.cat([p[k] for _, p in parts]) for k in self.RECORD}

    def reference(self, model: nn.Module, cache_path: Optional[str] = None) -> dict:
        """Score the float model once (or read its record from ``cache_path`` when it was
        saved there with the same key) and return its top-1 / top-5."""
        cache = FloatCache(cache_path, self.key)
        self.ref = cache.load(self.RECORD)
        if self.ref is None:
            self.ref = self._record(model)
            cache.save(self.ref)
        n = self.ref["labels"].shape[0]
        return {"images": n, "top1": 100.0 * int(self.ref["top1"].sum()) / n,
                "top5": 100.0 * int(self.ref["top5"].sum()) / n}

    def _first_images(self, images: int) -> torch.Tensor:
        """The first ``images`` readable images of the data (every rank the same ones: under
        torchrun they are read again, in the one-process batches)."""
        if rank_world()[1] == 1:
            source = (b[1:] for b in self._iter())
        else:
            from torch.utils.data import DataLoader
            from ..data import Batch
            unsharded = DataLoader(self.loader.dataset, batch_size=self.loader.batch_sampler.
                                   batch_size, collate_fn=self.loader.collate_fn)
            source = ((b.images, b.labels) if isinstance(b, Batch) else b[:2]
                      for b in unsharded)
        xs, have = [], 0
        for x, _ in source:  # the first batches only
            if x is None:
                continue
            xs.append(x)
            have += x.shape[0]
            if have >= images:
                break
        return torch.cat(xs)[:images]

    def calibrate(self, model: nn.Module, images: Optional[int] = None) -> None:
        """Rule 20: the analog ranges from the first ``images`` images of the data (default
        the scorer's ``calib_images``); rule 26's output gains (of the logits) from the same
        images where a layer is weighed by them."""
        from ...nn.calibration import calibrate
        from ...nn.gains import calibrate_gains, needs_gains
        x = self._first_images(self.calib_images if images is None else images).to(self.device)
        calibrate(model, x)
        if needs_gains(model):
            calibrate_gains(model, run=lambda m: m(x))

    def score(self, model: nn.Module) -> dict:
        rec = self._record(model)
        if self.ref is None or not torch.equal(rec["labels"], self.ref["labels"]):
            raise RuntimeError("ImageScorer.score: call reference() first, on the same images")
        n = rec["labels"].shape[0]
        c1, c5 = int(rec["top1"].sum()), int(rec["top5"].sum())
        agree = int((rec["argmax"] == self.ref["argmax"]).sum())
        return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n,
                "top1_agreement": 100.0 * agree / n, "images": n, "top1_correct": c1,
                "top5_correct": c5, "agreement_count": agree,
                "top1_bits": encode_bits(rec["top1"].tolist())}

    @staticmethod
    def paired(ref: Optional[dict], row: dict) -> dict:
        """The paired comparison of ``row`` with the reference row ``ref`` on the same images
        (:func:`paired_top1_drop` of their ``top1_bits``): ``top1_lost`` / ``top1_gained``
        and the 95% interval ``top1_drop_ci_low`` .. ``top1_drop_ci_high`` (points); all
        None when either row has no per-image record (a CSV written before it was kept)."""
        none = {"top1_drop_ci_low": None, "top1_drop_ci_high": None, "top1_lost": None,
                "top1_gained": None}
        if ref is None or not ref.get("top1_bits") or not row.get("top1_bits") or \
                ref.get("images") != row.get("images") or row.get("images") is None:
            return none
        if row is ref:  # no interval for the reference against itself
            return {**none, "top1_lost": 0, "top1_gained": 0}
        n = row["images"]
        d = paired_top1_drop(decode_bits(ref["top1_bits"], n), decode_bits(row["top1_bits"], n))
        return {"top1_drop_ci_low": d["low"], "top1_drop_ci_high": d["high"],
                "top1_lost": d["lost"], "top1_gained": d["gained"]}


def _is_sentence_transformer(model) -> bool:
    return any(c.__name__ == "SentenceTransformer" for c in type(model).__mro__)


class SentenceScorer:
    """:func:`embedding_fidelity` of crossbar against float sentence embeddings: MiniLM-L6
    (:class:`~crossbar_torch.apps.models.minilm.MiniLM`) or any ``SentenceTransformer`` (e.g.
    all-mpnet-base-v2), or what ``encode(model, sentences) -> (n, d)`` computes. Under
    ``torchrun`` rank ``r`` embeds the batches ``r, r + W, ...`` of ``batch_size`` sentences;
    the embeddings are gathered in sentence order before the fidelity is computed."""

    kind = "sentence"
    primary = "cosine_mean"
    drop = "cosine_drop"
    metrics = (("cosine_mean", float), ("cosine_min", float), ("cosine_drop", float),
               ("nn_agreement", float), ("nn_agreement_count", int), ("sentences", int))

    def __init__(self, sentences: Sequence[str], tokenizer=None, *, batch_size: int = 64,
                 key: Optional[dict] = None,
                 encode: Optional[Callable[[nn.Module, List[str]], torch.Tensor]] = None,
                 feedback: Optional[Sequence[str]] = None):
        self.sentences = list(sentences)
        # rule 21's calibration sentences (default feedback_sentences(): the packaged corpus)
        self.feedback = list(feedback) if feedback is not None else None
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.key = key
        self.encode = encode
        self.ref: Optional[torch.Tensor] = None

    def _encode(self, model: nn.Module, sentences: List[str], grad: bool = False) -> torch.Tensor:
        """The embeddings of ``sentences``; with ``grad`` differentiable (rule 26; a scorer's
        own ``encode`` is called as it is, and must then be differentiable)."""
        if self.encode is not None:
            return self.encode(model, sentences)
        if _is_sentence_transformer(model):
            from ..models.mpnet import embed_with_grad, encode_sentences as encode_st
            return (embed_with_grad(model, sentences) if grad
                    else encode_st(model, sentences, batch_size=self.batch_size))
        from ..models.minilm import encode_sentences, minilm_tokenizer
        if self.tokenizer is None:
            self.tokenizer = minilm_tokenizer()
        return encode_sentences(model, sentences, self.tokenizer, grad=grad)

    @torch.no_grad()
    def embed(self, model: nn.Module) -> torch.Tensor:
        """The embeddings ``(n, d)`` of every sentence, in order (this rank's batches, then
        gathered)."""
        model.eval()
        s, b = self.sentences, self.batch_size
        rank, world = rank_world()
        parts, error = [], None
        try:
            for k, i in enumerate(range(0, len(s), b)):
                if k % world == rank:
                    parts.append((k, self._encode(model, s[i:i + b]).float().cpu()))
        except Exception as e:  # shared with the other ranks, then raised on all
            error = e
        parts = sorted((p for ps in gather(parts, error) for p in ps), key=lambda p: p[0])
        return torch.cat([e for _, e in parts])

    def reference(self, model: nn.Module, cache_path: Optional[str] = None) -> dict:
        cache = FloatCache(cache_path, self.key)
        saved = cache.load(("outputs",))
        self.ref = saved["outputs"] if saved is not None else None
        if self.ref is None:
            self.ref = self.embed(model)
            cache.save({"outputs": self.ref})
        return {"sentences": len(self.sentences)}

    def calibrate(self, model: nn.Module, sentences: int = CALIBRATION_SENTENCES) -> None:
        """Rules 20 and 21: the analog ranges from the first ``sentences`` sentences scored;
        rule 21's input moments from the scorer's ``feedback`` sentences (default
        :func:`feedback_sentences`), none of which is scored (the fidelity of error feedback is
        measured out of sample). Every rank calibrates on the same sentences."""
        from ...nn.calibration import calibrate
        from ...feedback import needs_moments
        from ...nn.gains import calibrate_gains, needs_gains
        if needs_moments(model):
            text = self.feedback if self.feedback is not None else feedback_sentences()
        else:
            text = self.sentences[:sentences]
        calibrate(model, run=lambda m: self._encode(m, text))
        if needs_gains(model):  # rule 26: the float model's gains, on the first sentences
            calibrate_gains(model, run=lambda m: self._encode(m, text[:GAIN_SENTENCES],
                                                             grad=True))

    def score(self, model: nn.Module) -> dict:
        if self.ref is None:
            raise RuntimeError("SentenceScorer.score: call reference() first")
        emb = self.embed(model)
        return {**embedding_fidelity(self.ref, emb), "sentences": len(self.sentences)}
