"""The accuracy / writes frontier of a sweep of crossbar configurations (``scripts/frontier.py``).

For a float model and a sweep of named configurations, every row converts a fresh copy of the
float model (:func:`crossbar_torch.convert` deep-copies it), counts its writes
(:func:`crossbar_torch.reprogram_report`) and scores it against the float model:

* images (timm models, e.g. EfficientNet-Lite0): top-1 / top-5 (percent of the images), top-1
  agreement with the float model (percent of the images whose crossbar argmax is the float
  argmax) and the top-1 drop (points) from the reference row ``crossbar8``, paired: every row
  keeps which images it gets right (``top1_bits``, :func:`encode_bits`), so its drop comes
  with the images it loses and gains against ``crossbar8`` (``top1_lost``, ``top1_gained``)
  and a 95% interval ``top1_drop_ci_low`` .. ``top1_drop_ci_high`` (the Bonett-Price adjusted
  Wald interval for paired proportions, :func:`paired_top1_drop`);
* sentences (MiniLM-L6, all-mpnet-base-v2): :func:`embedding_fidelity` of the crossbar
  sentence embeddings against the float ones: mean and minimum cosine similarity, the drop of
  the mean from the reference row, and nearest-neighbour agreement (percent of the sentences
  whose nearest other sentence is the same under both); on real English
  (:func:`builtin_sentences`, ``crossbar_torch/corpus``), a user's file
  (:func:`read_sentences`) or the generated :func:`frontier_sentences`;
* both: the weight error ``sum |q_eff - q| / sum |q|`` over every crossbar weight of the model
  (``q`` the rule-2 target, ``q_eff`` what the crossbars hold, rule 9), i.e. mean |q_eff - q|
  over mean |q|.

The reference row ``crossbar8`` is the sweep's base configuration with no stucking, no
compensation and an ideal periphery (or the sweep's own run of that name, which must be all
three): the ideal 8-bit crossbar the drops are measured from. ``--set`` overrides change it too,
except for those fields (:func:`reference_config`). Without stucking and with an ideal
periphery every placement, sort and schedule computes exactly what it computes (rules 4 and
11), so its accuracy is that of any such row.

Outputs, rewritten atomically after every row: a CSV (one line per row) and a JSON (the same
rows with their full configurations, the float model's scores and the Pareto front). A rerun
with the same CSV skips the rows already in it (their values are read back), after checking
that they were measured on the same model, weights, data and preprocessing (the CSV's
``setup`` column, :func:`check_setup`) and each with the configuration the sweep now gives it.
The float model's
outputs are computed once and reused by every row (and kept beside the CSV, keyed by model,
weights and data, so a resumed run does not recompute them). :func:`plot_frontier` draws
reduction (x, log scale) against the drop (y) with the Pareto front marked.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, fields
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn

from ..config import CrossbarConfig, atomic_write, atomic_write_text
from ..nn.conversion import convert
from ..errors import UserInputError
from .evaluate import topk_correct
from ..nn.modules import crossbar_layers
from ..quantization import quantize_with_scale
from ..programming import reprogram
from ..report import reprogram_report

__all__ = ["REFERENCE", "SweepRun", "frontier_sentences", "builtin_sentences", "read_sentences",
           "BUILTIN_SENTENCES", "embedding_fidelity", "load_sweeps", "reference_config",
           "varying_fields", "weight_error", "pareto_front", "ImageScorer", "SentenceScorer",
           "read_previous", "check_setup", "run_frontier", "plot_frontier", "FrontierError",
           "paired_top1_drop", "encode_bits", "decode_bits"]

REFERENCE = "crossbar8"
CONFIG_FIELDS = tuple(f.name for f in fields(CrossbarConfig))


class FrontierError(UserInputError):
    """Bad input (sweep file, previous CSV, output path): one line naming what is wrong."""


# --------------------------------------------------------------------------- sentences

_TEMPLATES = (
    "The {s} {v} the {o}.",
    "Yesterday the {s} {v} the {o} near the old harbour.",
    "Why does everyone say that the {s} {v} the {o}?",
    "Nobody expected that the {s} {v} the {o} so quickly.",
    "Early in the morning, a {s} quietly {v} a {o} for the whole village.",
    "After a long argument about money, the {s} finally {v} the {o}.",
    "I read in the newspaper that a {s} {v} a {o} last week.",
    "Under the grey winter sky the {s} {v} the {o} and then went home.",
)
_SUBJECTS = ("old farmer", "young engineer", "nervous student", "famous chef", "tired nurse",
             "local mayor", "curious child", "retired pilot")
_VERBS = ("repaired", "painted", "sold", "described", "photographed", "carried", "studied",
          "ignored")
_OBJECTS = ("broken bicycle", "wooden table", "ancient map", "red umbrella", "new computer",
            "small boat", "long letter", "strange painting")
_STEP = 1283  # a prime: coprime with the 4096 combinations, so the walk visits distinct ones


def feedback_sentences(n: int = None) -> List[str]:
    """Rule 21's calibration sentences: generated ones that no default evaluation set holds
    (the ``FEEDBACK_SENTENCES`` after the 1024 first of :func:`frontier_sentences`; MiniLM is
    scored on the first 256 by default, mpnet on the real corpus)."""
    n = FEEDBACK_SENTENCES if n is None else n
    return frontier_sentences(1024 + n)[1024:]


def frontier_sentences(n: int = 256) -> List[str]:
    """``n`` distinct English sentences (at most 4096), the same on every call and machine.

    Combinations of 8 templates x 8 subjects x 8 verbs x 8 objects, visited in a fixed stride so
    consecutive sentences differ in every part; nothing is random, nothing is downloaded.
    """
    sizes = (len(_TEMPLATES), len(_SUBJECTS), len(_VERBS), len(_OBJECTS))
    total = math.prod(sizes)
    if not 1 <= n <= total:
        raise ValueError(f"frontier_sentences: n must be in [1, {total}], got {n}")
    out = []
    for i in range(n):
        idx = (i * _STEP) % total
        o, idx = idx % sizes[3], idx // sizes[3]
        v, idx = idx % sizes[2], idx // sizes[2]
        s, t = idx % sizes[1], idx // sizes[1]
        out.append(_TEMPLATES[t].format(s=_SUBJECTS[s], v=_VERBS[v], o=_OBJECTS[o]))
    return out


BUILTIN_SENTENCES = "corpus/sentences_en.txt"  # package data; sources: corpus/README.md
MAX_SENTENCE_CHARS = 10_000  # a longer "line" is not a sentence (a binary or a one-line file)


def builtin_sentences() -> List[str]:
    """The 330 real English sentences that ship with the package
    (``crossbar_torch/corpus/sentences_en.txt``: Python's reference and IDLE help, and
    scikit-learn's data set descriptions; sources and licences in ``corpus/README.md``)."""
    import importlib.resources
    text = (importlib.resources.files("crossbar_torch") / BUILTIN_SENTENCES).read_text("utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def read_sentences(path: str, flag: str = "--sentences", minimum: int = 2) -> List[str]:
    """The sentences of a UTF-8 text file, one a line (surrounding whitespace stripped, blank
    lines skipped, duplicates kept). Raises :class:`FrontierError`, one line naming the file,
    when it is missing, a folder, not UTF-8 text, has fewer than ``minimum`` sentences (the
    nearest-neighbour agreement needs two) or a line too long to be a sentence."""
    if os.path.isdir(path):
        raise FrontierError(f"{flag} {path!r} is a folder; give a text file, one sentence a line")
    if not os.path.isfile(path):
        hint = (" (--sentences takes a file now; --generated N gives N generated sentences)"
                if str(path).isdigit() else "")
        raise FrontierError(f"{flag}: file not found: {path!r}{hint}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if b"\0" in raw:
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\0"), raw.index(b"\0") + 1,
                                     "NUL byte (a binary file?)")
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise FrontierError(f"{flag} {path}: not UTF-8 text (line {line}: {e.reason}); give a "
                            "text file, one sentence a line") from None
    except OSError as e:
        raise FrontierError(f"{flag} {path}: cannot be read ({e.strerror or e})") from None
    out = []
    for i, ln in enumerate(text.splitlines(), start=1):
        ln = ln.strip()
        if not ln:
            continue
        if len(ln) > MAX_SENTENCE_CHARS:
            raise FrontierError(f"{flag} {path}: line {i} has {len(ln):,} characters; one "
                                f"sentence a line, at most {MAX_SENTENCE_CHARS:,}")
        out.append(ln)
    if len(out) < minimum:
        raise FrontierError(f"{flag} {path}: {len(out)} sentence(s); at least {minimum} "
                            "needed (one a line, blank lines are skipped)")
    return out


# --------------------------------------------------------------------------- sweeps


@dataclass(frozen=True)
class SweepRun:
    name: str
    config: CrossbarConfig
    source: str  # the sweep file (or "reference" for the added crossbar8 row)


def reference_config(base: CrossbarConfig) -> CrossbarConfig:
    """The ideal 8-bit crossbar of a sweep, every drop's reference: its base with no stucking,
    no compensation and an ideal periphery (no DAC, ADC, noise, drift or finite g_ratio), so a
    ``--set`` of those fields changes every row but this one."""
    return base.replace(stuck_slices=0, reprogram_fraction=1.0, stuck_value="initial",
                        compensate=False, **base._ideal_periphery())


def _config_error(path: str, what: str, fields: dict, over: dict, e: Exception) -> str:
    """The message for an invalid base or run: it blames ``--set`` when the sweep's own fields
    are valid without it."""
    if over:
        try:
            CrossbarConfig.from_dict(fields)
        except (ValueError, TypeError):
            pass
        else:
            sets = " ".join(f"--set {k}={v}" for k, v in over.items())
            return f"{sets}: makes {what} of {path} invalid: {e}"
    return f"{path}: {what}: {e}"


def _is_lossless(cfg: CrossbarConfig) -> bool:
    return not cfg.stucking and cfg.stuck_value == "initial"


def load_sweeps(paths: Sequence[str], overrides: Iterable[str] = ()) -> List[SweepRun]:
    """The runs of one or more sweep YAMLs ``{base: {fields}, runs: [{name, fields}, ...]}``,
    with ``overrides`` (``key=value``, the ``--set`` flag) applied to every run, reference row
    first. Raises :class:`FrontierError` naming the file, the run and the field."""
    import yaml

    from ..config import parse_overrides

    try:
        over = parse_overrides(overrides)
    except ValueError as e:
        raise FrontierError(f"--set: {e}") from None
    runs: List[SweepRun] = []
    first_base: Optional[CrossbarConfig] = None
    for path in paths:
        if os.path.isdir(path):
            raise FrontierError(f"sweep {path!r} is a folder, not a YAML file")
        if not os.path.isfile(path):
            raise FrontierError(f"sweep file not found: {path!r}")
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            msg = " ".join(str(e).split())
            raise FrontierError(f"{path}: not valid YAML ({msg})") from None
        if not isinstance(data, dict) or not isinstance(data.get("runs"), list) or not data["runs"]:
            raise FrontierError(f"{path}: expected a mapping with 'base' (config fields) and "
                                "'runs' (a non-empty list of {name: ..., field: value, ...})")
        extra = sorted(set(data) - {"base", "runs"})
        if extra:
            raise FrontierError(f"{path}: unknown top-level key(s) {extra}; expected 'base' "
                                "and 'runs'")
        base_d = data.get("base") or {}
        if not isinstance(base_d, dict):
            raise FrontierError(f"{path}: 'base' must be a mapping of CrossbarConfig fields")
        try:
            base = CrossbarConfig.from_dict({**base_d, **over})
        except (ValueError, TypeError) as e:
            raise FrontierError(_config_error(path, "base", base_d, over, e)) from None
        if first_base is None:
            first_base = base
        for i, run in enumerate(data["runs"]):
            if not isinstance(run, dict) or "name" not in run:
                raise FrontierError(f"{path}: runs[{i}] must be a mapping with a 'name'")
            run = dict(run)
            name = run.pop("name")
            if not isinstance(name, (str, int, float)) or not str(name).strip():
                raise FrontierError(f"{path}: runs[{i}]: name {name!r} must be a non-empty string")
            name = str(name).strip()
            if any(ch in name for ch in "\n\r"):
                raise FrontierError(f"{path}: runs[{i}]: name {name!r} must be one line")
            if name == REFERENCE:  # the sweep's own reference: checked without --set
                try:
                    own = CrossbarConfig.from_dict({**base_d, **run})
                except (ValueError, TypeError) as e:
                    raise FrontierError(f"{path}: run {name!r}: {e}") from None
                if not _is_lossless(own) or own.analog:
                    raise FrontierError(
                        f"{path}: run {REFERENCE!r} is the reference 8-bit crossbar: it must "
                        "have no stucking (stuck_slices 0 or reprogram_fraction 1, stuck_value "
                        "initial) and an ideal periphery (no input_bits, adc_bits, g_ratio, "
                        "noise or drift)")
            try:
                cfg = CrossbarConfig.from_dict({**base_d, **run, **over})
            except (ValueError, TypeError) as e:
                raise FrontierError(_config_error(path, f"run {name!r}", {**base_d, **run},
                                                  over, e)) from None
            if name == REFERENCE:  # --set changes it but for stucking and the periphery
                cfg = reference_config(cfg)
            if any(r.name == name for r in runs):
                raise FrontierError(f"{path}: run name {name!r} appears twice (names key the "
                                    "rows of the CSV: make them unique)")
            runs.append(SweepRun(name, cfg, path))
    if not paths:
        raise FrontierError("no sweep file given")
    ref = [r for r in runs if r.name == REFERENCE]
    if ref:  # checked (without --set) where it was read
        runs.remove(ref[0])
        runs.insert(0, ref[0])
    else:
        runs.insert(0, SweepRun(REFERENCE, reference_config(first_base), "reference"))
    return runs


def varying_fields(configs: Iterable[CrossbarConfig]) -> List[str]:
    """The CrossbarConfig fields whose value differs between ``configs`` (field order)."""
    dicts = [c.to_dict() for c in configs]
    return [f for f in CONFIG_FIELDS if len({json.dumps(d[f]) for d in dicts}) > 1]


# --------------------------------------------------------------------------- metrics


@torch.no_grad()
def weight_error(model: nn.Module) -> dict:
    """``sum |q_eff - q| / sum |q|`` over every crossbar weight of ``model``.

    ``q``: the rule-2 quantization of the layer's current weight with its (fixed) scales, the
    value programming aims for; ``q_eff``: what its cells decode to (rule 9). Returns
    ``{"weight_error", "abs_error", "abs_target", "weights"}`` (the sums are integers).
    """
    num = den = n = 0
    for _, layer in crossbar_layers(model):
        cfg = layer.config
        w = layer.matrix_weight().detach().to(torch.float32).cpu()
        q = quantize_with_scale(w, layer.scale.cpu(), cfg.weight_bits).to(torch.int64)
        q_eff = layer.effective_q().cpu().to(torch.int64)
        num += int((q_eff - q).abs().sum())
        den += int(q.abs().sum())
        n += q.numel()
    return {"weight_error": num / den if den else 0.0, "abs_error": num, "abs_target": den,
            "weights": n}


def pareto_front(points: Sequence[tuple]) -> List[int]:
    """Indices of the Pareto-optimal points ``(x, y)`` maximizing x and minimizing y, in
    increasing x. A point is dropped when another is at least as good in both and better in
    one; equal points are all kept. Points with a non-finite coordinate are left out."""
    ok = [i for i, (x, y) in enumerate(points)
          if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    front = []
    for i in ok:
        xi, yi = points[i]
        dominated = any(points[j][0] >= xi and points[j][1] <= yi
                        and (points[j][0] > xi or points[j][1] < yi) for j in ok)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], points[i][1]))


# --------------------------------------------------------------------------- scorers


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


CALIBRATION_IMAGES = 8       # images that set the analog ranges (rule 20)
CALIBRATION_SENTENCES = 32
FEEDBACK_SENTENCES = 128     # generated sentences whose inputs set rule 21's moments


Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: two-sided 95%


def encode_bits(bits: Sequence) -> str:
    """Per-image 0/1 flags as hexadecimal: image ``i``'s flag is bit ``3 - i % 4`` of hex
    digit ``i // 4`` (the first image is the first digit's most significant bit; the last
    digit is padded with zeros). ``"1011" + "1"`` -> ``"b8"``. :func:`decode_bits` inverts it."""
    flags = [1 if b else 0 for b in bits]
    flags += [0] * (-len(flags) % 4)
    return "".join("%x" % (flags[i] * 8 + flags[i + 1] * 4 + flags[i + 2] * 2 + flags[i + 3])
                   for i in range(0, len(flags), 4))


def decode_bits(text: str, n: int) -> List[int]:
    """The ``n`` flags :func:`encode_bits` wrote as ``text``; raises ValueError when ``text``
    is not hexadecimal of exactly ``ceil(n / 4)`` digits."""
    if len(text) != (n + 3) // 4 or any(c not in "0123456789abcdef" for c in text.lower()):
        raise ValueError(f"top1_bits: expected {(n + 3) // 4} hex digits for {n} images, "
                         f"got {text[:20]!r}{'...' if len(text) > 20 else ''}")
    return [(int(c, 16) >> (3 - j)) & 1 for c in text for j in range(4)][:n]


def paired_top1_drop(ref: Sequence, row: Sequence, z: float = Z95) -> dict:
    """The top-1 drop of ``row`` from ``ref`` (points) with its paired confidence interval,
    from the per-image correctness of both on the same ``n`` images.

    ``lost`` = images ``ref`` gets right and ``row`` wrong, ``gained`` = the opposite (the
    discordant pairs; images both get right or both wrong say nothing about the difference).
    ``drop = 100 (lost - gained) / n``. The interval is the Bonett-Price adjusted Wald
    interval for a difference of paired proportions (Bonett & Price 2012, J. Educ. Behav.
    Stat. 37:479; recommended by Fagerland, Lydersen & Laake 2014, Stat. Methods Med. Res.):
    with ``pl = (lost + 1) / (n + 2)`` and ``pg = (gained + 1) / (n + 2)``,
    ``100 [(pl - pg) +- z sqrt((pl + pg - (pl - pg)^2) / (n + 2))]``, ``z`` = 1.96 for 95%.
    Unlike the plain normal interval of the mean paired difference it does not collapse to
    zero width when no image changes (0 lost, 0 gained on 500 images: -0.55 .. +0.55 points).
    Returns ``{"drop", "low", "high", "lost", "gained", "n"}``.
    """
    if len(ref) != len(row) or not len(ref):
        raise ValueError(f"paired_top1_drop: need the same non-zero number of images, got "
                         f"{len(ref)} and {len(row)}")
    n = len(ref)
    lost = sum(1 for a, b in zip(ref, row) if a and not b)
    gained = sum(1 for a, b in zip(ref, row) if b and not a)
    pl, pg = (lost + 1) / (n + 2), (gained + 1) / (n + 2)
    half = z * math.sqrt((pl + pg - (pl - pg) ** 2) / (n + 2))
    return {"drop": 100.0 * (lost - gained) / n, "low": 100.0 * (pl - pg - half),
            "high": 100.0 * (pl - pg + half), "lost": lost, "gained": gained, "n": n}


class ImageScorer:
    """Top-1 / top-5 on labelled images and top-1 agreement with the float model.

    ``loader`` yields ``(images, labels[, indices])`` or :class:`~crossbar_torch.apps.data.Batch`
    (``collate_skip_bad``); with ``cache`` the preprocessed batches are kept in memory after the
    first pass (``len(dataset) * 3 * H * W`` floats), else every row reads the images again.
    ``on_bad(record)`` is called for each unreadable image (default: raise).
    """

    kind = "image"
    primary = "top1"
    drop = "top1_drop"
    metrics = (("top1", float), ("top5", float), ("top1_agreement", float),
               ("top1_drop", float), ("top1_drop_ci_low", float), ("top1_drop_ci_high", float),
               ("top1_lost", int), ("top1_gained", int), ("images", int),
               ("top1_correct", int), ("top5_correct", int), ("agreement_count", int),
               ("top1_bits", str))

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
        self.ref_logits: Optional[torch.Tensor] = None
        self.labels: Optional[torch.Tensor] = None
        self._bad_reported = False

    def _iter(self):
        if self._batches is not None:
            yield from self._batches
            return
        from .data import Batch, UnreadableImageError
        keep = [] if self.cache else None
        for batch in self.loader:
            if isinstance(batch, Batch):
                x, y, bad = batch.images, batch.labels, batch.bad
            else:
                x, y, bad = batch[0], batch[1], []
            for b in bad:
                if self.on_bad is None:
                    raise UnreadableImageError(b.path, b.reason)
                if not self._bad_reported:  # listed once, not once per row
                    self.on_bad(b)
            if x is None or not x.shape[0]:
                continue
            if keep is not None:
                keep.append((x, y))
            yield x, y
        self._bad_reported = True
        if keep is not None:
            self._batches = keep

    @torch.no_grad()
    def _logits(self, model: nn.Module):
        model.eval()
        outs, labels = [], []
        for x, y in self._iter():
            outs.append(model(x.to(self.device)).float().cpu())
            labels.append(y.cpu())
        if not outs:
            raise FrontierError("no readable images to evaluate")
        return torch.cat(outs), torch.cat(labels)

    def reference(self, model: nn.Module, cache_path: Optional[str] = None) -> dict:
        """Run the float model once (or read its outputs from ``cache_path`` when they were
        saved there with the same key) and return its top-1 / top-5."""
        key = _hash(self.key) if self.key is not None else None
        if cache_path and key and os.path.isfile(cache_path):
            try:
                saved = torch.load(cache_path, map_location="cpu", weights_only=True)
            except Exception:  # unreadable cache: recompute
                saved = None
            if isinstance(saved, dict) and saved.get("key") == key:
                self.ref_logits, self.labels = saved["outputs"], saved["labels"]
        if self.ref_logits is None:
            self.ref_logits, self.labels = self._logits(model)
            if cache_path and key:
                atomic_write(cache_path, lambda f: torch.save(
                    {"key": key, "outputs": self.ref_logits, "labels": self.labels}, f),
                    binary=True)
        n = self.labels.shape[0]
        return {"images": n,
                "top1": 100.0 * int(topk_correct(self.ref_logits, self.labels, 1).sum()) / n,
                "top5": 100.0 * int(topk_correct(self.ref_logits, self.labels, 5).sum()) / n}

    def calibrate(self, model: nn.Module, images: Optional[int] = None) -> None:
        """Rule 20: the analog ranges from the first ``images`` images of the data (default
        the scorer's ``calib_images``)."""
        from ..nn.calibration import calibrate
        images = self.calib_images if images is None else images
        xs, have = [], 0
        for b in self._iter():  # the first batches only
            xs.append(b[0])
            have += b[0].shape[0]
            if have >= images:
                break
        x = torch.cat(xs)[:images]
        calibrate(model, x.to(self.device))

    def score(self, model: nn.Module) -> dict:
        logits, labels = self._logits(model)
        if self.ref_logits is None or logits.shape != self.ref_logits.shape or \
                not torch.equal(labels, self.labels):
            raise RuntimeError("ImageScorer.score: call reference() first, on the same images")
        n = labels.shape[0]
        c1 = int(topk_correct(logits, labels, 1).sum())
        c5 = int(topk_correct(logits, labels, 5).sum())
        agree = int((logits.argmax(-1) == self.ref_logits.argmax(-1)).sum())
        bits = encode_bits(topk_correct(logits, labels, 1).tolist())
        return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n,
                "top1_agreement": 100.0 * agree / n, "images": n, "top1_correct": c1,
                "top5_correct": c5, "agreement_count": agree, "top1_bits": bits}

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


@torch.no_grad()
def embedding_fidelity(ref: torch.Tensor, emb: torch.Tensor) -> dict:
    """How well sentence embeddings ``emb`` (n, d) keep the float ones ``ref`` (n, d), in
    double precision:

    * ``cosine_mean`` / ``cosine_min``: cosine similarity of each sentence's two embeddings;
    * ``nn_agreement`` (percent) / ``nn_agreement_count``: the sentences whose nearest other
      sentence (largest cosine similarity, itself excluded) is the same under ``emb`` as under
      ``ref``; a tie goes to the lowest index, under both. Needs n >= 2.
    """
    if ref.shape != emb.shape or ref.dim() != 2:
        raise ValueError(f"embedding_fidelity: shapes {tuple(ref.shape)} and "
                         f"{tuple(emb.shape)} must be equal (n, d)")
    n = ref.shape[0]
    if n < 2:
        raise ValueError(f"embedding_fidelity: nearest neighbours need 2 sentences, got {n}")
    cos = torch.nn.functional.cosine_similarity(emb.double(), ref.double(), dim=-1)
    r = torch.nn.functional.normalize(ref.double(), dim=-1)
    e = torch.nn.functional.normalize(emb.double(), dim=-1)

    def nearest(x):
        sim = x @ x.T
        sim.fill_diagonal_(-math.inf)
        return sim.argmax(-1)  # the first maximal index on ties

    agree = int((nearest(r) == nearest(e)).sum())
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "nn_agreement": 100.0 * agree / n, "nn_agreement_count": agree}


def _is_sentence_transformer(model) -> bool:
    return any(c.__name__ == "SentenceTransformer" for c in type(model).__mro__)


class SentenceScorer:
    """:func:`embedding_fidelity` of crossbar against float sentence embeddings: MiniLM-L6
    (:class:`~crossbar_torch.apps.models.minilm.MiniLM`) or any ``SentenceTransformer`` (e.g.
    all-mpnet-base-v2), or what ``encode(model, sentences) -> (n, d)`` computes."""

    kind = "sentence"
    primary = "cosine_mean"
    drop = "cosine_drop"
    metrics = (("cosine_mean", float), ("cosine_min", float), ("cosine_drop", float),
               ("nn_agreement", float), ("nn_agreement_count", int), ("sentences", int))

    def __init__(self, sentences: Sequence[str], tokenizer=None, *, batch_size: int = 64,
                 key: Optional[dict] = None,
                 encode: Optional[Callable[[nn.Module, List[str]], torch.Tensor]] = None):
        self.sentences = list(sentences)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.key = key
        self.encode = encode
        self.ref: Optional[torch.Tensor] = None

    def _encode(self, model: nn.Module, sentences: List[str]) -> torch.Tensor:
        if self.encode is not None:
            return self.encode(model, sentences)
        if _is_sentence_transformer(model):
            from .models.mpnet import encode_sentences as encode_st
            return encode_st(model, sentences, batch_size=self.batch_size)
        from .models.minilm import encode_sentences, minilm_tokenizer
        if self.tokenizer is None:
            self.tokenizer = minilm_tokenizer()
        return encode_sentences(model, sentences, self.tokenizer)

    @torch.no_grad()
    def embed(self, model: nn.Module) -> torch.Tensor:
        model.eval()
        s, b = self.sentences, self.batch_size
        return torch.cat([self._encode(model, s[i:i + b]).float()
                          for i in range(0, len(s), b)])

    def reference(self, model: nn.Module, cache_path: Optional[str] = None) -> dict:
        key = _hash(self.key) if self.key is not None else None
        if cache_path and key and os.path.isfile(cache_path):
            try:
                saved = torch.load(cache_path, map_location="cpu", weights_only=True)
            except Exception:
                saved = None
            if isinstance(saved, dict) and saved.get("key") == key:
                self.ref = saved["outputs"]
        if self.ref is None:
            self.ref = self.embed(model)
            if cache_path and key:
                atomic_write(cache_path, lambda f: torch.save(
                    {"key": key, "outputs": self.ref}, f), binary=True)
        return {"sentences": len(self.sentences)}

    def calibrate(self, model: nn.Module, sentences: int = CALIBRATION_SENTENCES) -> None:
        """Rules 20 and 21: the analog ranges from the first ``sentences`` sentences scored;
        rule 21's input moments from ``FEEDBACK_SENTENCES`` generated sentences, none of which
        is scored (the fidelity of error feedback is measured out of sample)."""
        from ..nn.calibration import calibrate
        from ..feedback import needs_moments
        text = (feedback_sentences() if needs_moments(model) else self.sentences[:sentences])
        calibrate(model, run=lambda m: self._encode(m, text))

    def score(self, model: nn.Module) -> dict:
        if self.ref is None:
            raise RuntimeError("SentenceScorer.score: call reference() first")
        emb = self.embed(model)
        return {**embedding_fidelity(self.ref, emb), "sentences": len(self.sentences)}


# --------------------------------------------------------------------------- table (CSV / JSON)

REPORT_COLUMNS = (("writes_per_pass", int), ("baseline_writes_per_pass", int),
                  ("reduction", float), ("initial_writes", int))
TAIL_COLUMNS = (("weight_error", float), ("convert_seconds", float), ("eval_seconds", float))


def _columns(scorer_cls, varying: Sequence[str]) -> List[str]:
    return (["name", *varying] + [c for c, _ in REPORT_COLUMNS]
            + [c for c, _ in scorer_cls.metrics] + [c for c, _ in TAIL_COLUMNS] + ["config"])


def _types(scorer_cls) -> dict:
    return dict(REPORT_COLUMNS + tuple(scorer_cls.metrics) + TAIL_COLUMNS)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "inf" if v == float("inf") else repr(v)
    return str(v)


def _parse(text: str, typ):
    if text == "":
        return None
    if typ is int:
        return int(text)
    if typ is str:
        return text
    return float(text)


SETUP_COLUMN = "setup"  # what every row was measured on: model, weights, data, reference


def _brief(v, limit: int = 70) -> str:
    text = json.dumps(v, sort_keys=True)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_setup(previous: Dict[str, dict], setup: dict, csv_path: str) -> None:
    """Refuse to resume a CSV whose rows were measured on another setup than ``setup`` (the
    model, its weights, the data and its preprocessing, the reference row: what the script
    puts in ``meta["setup"]``), naming every field that differs; or whose rows carry no setup
    (written by hand or by an older version), since nothing says what they measured."""
    for name, row in previous.items():
        theirs = row.get(SETUP_COLUMN)
        if theirs is None:
            raise FrontierError(
                f"{csv_path}: row {name!r} carries no record of the model and data it was "
                "measured on (a CSV written by hand or by an older frontier.py), so it cannot "
                "be resumed; write to another --csv, or remove it to measure every row again")
        diff = []
        for k in sorted(set(theirs) | set(setup)):
            a, b = theirs.get(k), setup.get(k)
            if isinstance(a, dict) and isinstance(b, dict):  # name the fields inside
                diff += [(f"{k}.{j}", a.get(j), b.get(j)) for j in sorted(set(a) | set(b))
                         if a.get(j) != b.get(j)]
            elif a != b:
                diff.append((k, a, b))
        if diff:
            raise FrontierError(
                f"{csv_path} was measured on another setup than this run's: "
                + "; ".join(f"{k} {_brief(a)} (csv) vs {_brief(b)} (now)" for k, a, b in diff)
                + "; write to another --csv, or remove it to measure every row again")


def read_previous(csv_path: Optional[str], runs: Sequence[SweepRun], scorer_cls) -> Dict[str, dict]:
    """Rows of an earlier run of the tool (``{name: row}``), checked against the sweep: a row
    whose configuration is not the one the sweep gives its name is an error (a mislabelled
    result), so is a CSV the tool did not write. Rows the sweep does not name are kept."""
    if not csv_path or not os.path.exists(csv_path):
        return {}
    if os.path.isdir(csv_path):
        raise FrontierError(f"--csv {csv_path!r} is a folder; give a file path")
    types = _types(scorer_cls)
    try:
        with open(csv_path, newline="") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise FrontierError(f"{csv_path}: cannot read the previous results ({e})") from None
    if not text.strip():
        return {}
    reader = csv.DictReader(io.StringIO(text))
    need = {"name", "config", *[c for c, _ in REPORT_COLUMNS], scorer_cls.primary}
    missing = sorted(need - set(reader.fieldnames or ()))
    if missing:
        raise FrontierError(f"{csv_path}: not a {scorer_cls.kind} frontier CSV (missing columns "
                            f"{missing}); write to another --csv or remove it")
    by_name = {r.name: r for r in runs}
    out: Dict[str, dict] = {}
    for line, rec in enumerate(reader, start=2):
        name = rec.get("name") or ""
        try:
            cfg = CrossbarConfig.from_dict(json.loads(rec["config"]))
            row = {"name": name, "config": cfg}
            for col, typ in types.items():
                if col in rec:
                    row[col] = _parse(rec[col], typ)
            if row.get("top1_bits") is not None:  # per-image record: as many as the images
                decode_bits(row["top1_bits"], row.get("images") or 0)
            setup = rec.get(SETUP_COLUMN)
            row[SETUP_COLUMN] = json.loads(setup) if setup else None
        except (ValueError, TypeError, KeyError) as e:
            raise FrontierError(f"{csv_path}: line {line} (row {name!r}) cannot be read ({e}); "
                                "fix or remove it") from None
        if name in out:
            raise FrontierError(f"{csv_path}: row {name!r} appears twice (line {line})")
        run = by_name.get(name)
        diff = cfg.diff(run.config) if run is not None else {}
        if diff:
            raise FrontierError(f"{csv_path}: row {name!r} was measured with another config "
                                f"(field: (csv, sweep) {diff}); remove that line or write to "
                                "another --csv")
        out[name] = row
    return out


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else None
    return v


def _row_points(rows: Sequence[dict], scorer_cls):
    return [(r.get("reduction"), r.get(scorer_cls.drop)) for r in rows]


def write_outputs(rows: Sequence[dict], scorer_cls, csv_path: str, json_path: Optional[str],
                  meta: dict) -> None:
    """Rewrite the CSV and the JSON (atomically) from ``rows``."""
    varying = varying_fields([r["config"] for r in rows]) if len(rows) > 1 else []
    setup = meta.get(SETUP_COLUMN)
    cols = _columns(scorer_cls, varying) + ([SETUP_COLUMN] if setup is not None else [])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        cd = r["config"].to_dict()
        line = []
        for c in cols:
            if c == "config":
                line.append(json.dumps(cd))
            elif c == SETUP_COLUMN:  # checked when the CSV is resumed (check_setup)
                line.append(json.dumps(setup, sort_keys=True))
            elif c in varying and c not in r:
                line.append(_fmt(cd[c]))
            else:
                line.append(_fmt(r.get(c)))
        w.writerow(line)
    atomic_write_text(csv_path, buf.getvalue())
    if json_path:
        front = pareto_front(_row_points(rows, scorer_cls))
        out = {**meta,
               "reference": REFERENCE,
               "varying_fields": varying,
               "pareto_front": [rows[i]["name"] for i in front],
               "rows": [{**{k: _json_value(v) for k, v in r.items()
                            if k not in ("config", SETUP_COLUMN)},
                         "config": r["config"].to_dict()} for r in rows]}
        atomic_write_text(json_path, json.dumps(out, indent=2) + "\n")


# --------------------------------------------------------------------------- the run


def run_frontier(float_model: nn.Module, runs: Sequence[SweepRun], scorer, *, csv_path: str,
                 json_path: Optional[str] = None, png_path: Optional[str] = None,
                 meta: Optional[dict] = None, previous: Optional[Dict[str, dict]] = None,
                 float_cache: Optional[str] = None, progress: bool = False,
                 log: Callable[[str], None] = lambda s: None, title: str = "") -> List[dict]:
    """Evaluate every run (skipping those ``previous`` holds), rewriting the CSV / JSON after
    each row; draw the PNG at the end. Returns the rows (sweep order, then rows of the previous
    CSV the sweep does not name)."""
    if not runs or runs[0].name != REFERENCE:
        raise ValueError(f"run_frontier: the first run must be the reference {REFERENCE!r} "
                         "(load_sweeps puts it there)")
    meta = dict(meta or {})
    previous = dict(previous if previous is not None else read_previous(csv_path, runs,
                                                                        type(scorer)))
    if meta.get(SETUP_COLUMN) is not None:
        meta[SETUP_COLUMN] = json.loads(json.dumps(meta[SETUP_COLUMN]))  # as read back
        check_setup(previous, meta[SETUP_COLUMN], csv_path)
    names = {r.name for r in runs}
    extra = [row for name, row in previous.items() if name not in names]
    if extra:
        log(f"keeping {len(extra)} row(s) of {csv_path} the sweep does not name: "
            + ", ".join(r["name"] for r in extra))
    todo = [r for r in runs if r.name not in previous]
    if len(todo) < len(runs):
        log(f"resuming {csv_path}: {len(runs) - len(todo)} row(s) already measured, "
            f"{len(todo)} to go")
    t0 = time.perf_counter()
    meta["float"] = scorer.reference(float_model, float_cache)
    meta["float_seconds"] = time.perf_counter() - t0

    rows: Dict[str, dict] = {}
    for r in runs:
        if r.name in previous:
            rows[r.name] = dict(previous[r.name])
    done_order = lambda: [rows[r.name] for r in runs if r.name in rows] + extra  # noqa: E731

    def refresh_drops():
        ref = rows.get(REFERENCE)
        paired = getattr(scorer, "paired", None)  # images: the paired interval of the drop
        for row in list(rows.values()) + extra:
            p = row.get(scorer.primary)
            row[scorer.drop] = (ref[scorer.primary] - p
                                if ref is not None and p is not None else None)
            if paired is not None:
                row.update(paired(ref, row))

    from tqdm.auto import tqdm
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc="frontier", unit="config",
               disable=not progress, dynamic_ncols=True)
    try:
        for run in todo:
            bar.set_postfix_str(run.name[:40])
            t1 = time.perf_counter()
            xmodel = convert(float_model, run.config)  # a fresh deep copy, programmed
            feedback = run.config.feedback != "none"
            if run.config.analog or feedback:  # rules 20, 21: ranges / moments from samples
                scorer.calibrate(xmodel)
            if feedback:  # rule 21 programs with the moments just measured
                reprogram(xmodel)
            rep = reprogram_report(xmodel).to_dict()
            t2 = time.perf_counter()
            scores = scorer.score(xmodel)
            t3 = time.perf_counter()
            werr = weight_error(xmodel)
            del xmodel
            red = rep["reduction"]
            row = {"name": run.name, "config": run.config,
                   "writes_per_pass": rep["writes_per_pass"],
                   "baseline_writes_per_pass": rep["baseline_writes_per_pass"],
                   "reduction": float("inf") if red == "inf" else red,
                   "initial_writes": rep["initial_writes"],
                   **scores,
                   "weight_error": werr["weight_error"],
                   "convert_seconds": round(t2 - t1, 3), "eval_seconds": round(t3 - t2, 3)}
            rows[run.name] = row
            refresh_drops()
            write_outputs(done_order(), type(scorer), csv_path, json_path, meta)
            red_s = f"{row['reduction']:.3f}x" if row["reduction"] is not None else "n/a"
            with tqdm.external_write_mode(file=sys.stderr):  # a line above the bar
                log(f"{run.name}: reduction {red_s}, {scorer.primary} {row[scorer.primary]:.4f}, "
                    f"drop {row[scorer.drop]:+.4f}, weight error {row['weight_error']:.4f} "
                    f"({t3 - t1:.0f} s)")
            bar.update(1)
    finally:
        bar.close()
    refresh_drops()
    out = done_order()
    write_outputs(out, type(scorer), csv_path, json_path, meta)
    if png_path:
        plot_frontier(out, png_path, type(scorer), title=title)
    return out


# --------------------------------------------------------------------------- plot


def _category(cfg: CrossbarConfig) -> str:
    """The legend group of a row: what makes it lose accuracy (stucking, the analog
    periphery: DAC, ADC, finite g_ratio, noise or drift), or nothing (lossless)."""
    if cfg.stucking and cfg.analog:
        return "stucking + analog periphery"
    if cfg.analog:
        return "analog periphery (DAC / ADC / noise), no stucking"
    if not cfg.stucking:
        return "lossless (no stucking)"
    return "stucking + compensation" if cfg.compensate else "stucking, no compensation"


_STYLE = {"lossless (no stucking)": ("tab:blue", "o"),
          "analog periphery (DAC / ADC / noise), no stucking": ("tab:orange", "D"),
          "stucking + compensation": ("tab:green", "s"),
          "stucking, no compensation": ("tab:red", "^"),
          "stucking + analog periphery": ("tab:purple", "v")}


def _box_distance(box, p) -> float:
    dx = max(box[0] - p[0], 0.0, p[0] - box[2])
    dy = max(box[1] - p[1], 0.0, p[1] - box[3])
    return math.hypot(dx, dy)


def _place_labels(ax, xy_px, texts, fontsize, obstacles=()):
    """Put each label next to its point where it overlaps no other label and no point
    (display coordinates), trying offsets of growing distance; a leader line when far."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    axbox = ax.get_window_extent(renderer)
    dpi = fig.dpi / 72.0
    placed = list(obstacles)  # bboxes (x0, y0, x1, y1) in pixels
    pts = [(x - 5 * dpi, y - 5 * dpi, x + 5 * dpi, y + 5 * dpi) for x, y in xy_px]
    dirs = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)]
    anns = []

    def overlap(a, b):
        w = min(a[2], b[2]) - max(a[0], b[0])
        h = min(a[3], b[3]) - max(a[1], b[1])
        return w * h if w > 0 and h > 0 else 0.0

    order = sorted(range(len(texts)), key=lambda i: (xy_px[i][0], xy_px[i][1]))
    for i in order:
        x, y = xy_px[i]
        t = ax.text(0, 0, texts[i], fontsize=fontsize)
        bb = t.get_window_extent(renderer)
        tw, th = bb.width, bb.height
        t.remove()
        best = None
        for dist in (6, 10, 16, 24, 34, 46, 60, 80):
            for dx, dy in dirs:
                ox, oy = dx * dist * dpi, dy * dist * dpi
                x0 = x + ox + (0 if dx > 0 else -tw if dx < 0 else -tw / 2)
                y0 = y + oy + (0 if dy > 0 else -th if dy < 0 else -th / 2)
                box = (x0, y0, x0 + tw, y0 + th)
                cost = sum(overlap(box, p) for p in placed) + sum(
                    overlap(box, p) for j, p in enumerate(pts) if j != i)
                outside = (max(0, axbox.x0 - box[0]) + max(0, box[2] - axbox.x1)
                           + max(0, axbox.y0 - box[1]) + max(0, box[3] - axbox.y1))
                cost += outside * th * 10
                if best is None or cost < best[0] - 1e-9:
                    best = (cost, box, ox, oy, dx, dy, dist)
            if best[0] == 0:
                break
        cost, box, ox, oy, dx, dy, dist = best
        placed.append(box)
        ha = "left" if dx > 0 else "right" if dx < 0 else "center"
        va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
        # a leader line when the label is far, or when another point is about as close to it
        # as its own (so no label reads as another point's)
        own = _box_distance(box, (x, y))
        near = min((_box_distance(box, q) for j, q in enumerate(xy_px) if j != i),
                   default=float("inf"))
        arrow = dict(arrowstyle="-", color="0.55", lw=0.6, shrinkA=0, shrinkB=3) \
            if dist >= 10 or near < own + 12 * dpi else None
        anns.append(ax.annotate(texts[i], xy=ax.transData.inverted().transform((x, y)),
                                xytext=(ox / dpi, oy / dpi), textcoords="offset points",
                                ha=ha, va=va, fontsize=fontsize, arrowprops=arrow))
    return anns


def plot_frontier(rows: Sequence[dict], path: str, scorer_cls, *, title: str = "") -> None:
    """Reduction (x, log) against the drop from the reference (y); Pareto front, labels:
    :func:`draw_frontier` written to ``path`` as a PNG (atomically)."""
    import matplotlib.pyplot as plt
    fig = draw_frontier(rows, scorer_cls, title=title)
    try:
        tmp_dir = os.path.dirname(os.path.abspath(path))
        os.makedirs(tmp_dir, exist_ok=True)
        atomic_write(path, lambda f: fig.savefig(f, format="png"), binary=True)
    finally:
        plt.close(fig)


def draw_frontier(rows: Sequence[dict], scorer_cls, *, title: str = ""):
    """The frontier figure (see :func:`plot_frontier`); its legend sits outside the axes, so
    it covers no point. The caller closes it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import (FixedLocator, FuncFormatter, LogLocator, NullFormatter,
                                   NullLocator)

    sentence = scorer_cls.kind == "sentence"
    pts = []
    for r in rows:
        x = r.get("reduction")
        if sentence:
            y = None if r.get("cosine_mean") is None else 1.0 - r["cosine_mean"]
        else:
            y = r.get(scorer_cls.drop)
        if x is None or y is None or not math.isfinite(x) or not math.isfinite(y):
            continue
        pts.append((r, x, y))
    extra = max(0, len(rows) - 15)  # more room for more labels
    fig, ax = plt.subplots(figsize=(11 + 0.08 * extra, 6.5 + 0.08 * extra), dpi=110)
    if not pts:
        ax.text(0.5, 0.5, "no finite points to plot", ha="center", transform=ax.transAxes)
    else:
        if sentence:
            ymin = min(max(y, 1e-6) for _, _, y in pts)
            pts = [(r, x, max(y, ymin)) for r, x, y in pts]  # 1 - cos can round to 0
        for cat, (color, marker) in _STYLE.items():
            sel = [(x, y) for r, x, y in pts if _category(r["config"]) == cat]
            if sel:
                ax.scatter(*zip(*sel), s=42, color=color, marker=marker, zorder=3,
                           edgecolor="black", linewidth=0.5, label=cat)
        ci = [(x, y, r["top1_drop_ci_low"], r["top1_drop_ci_high"]) for r, x, y in pts
              if not sentence and r.get("top1_drop_ci_low") is not None
              and r.get("top1_drop_ci_high") is not None]
        if ci:  # the paired 95% interval of each drop (paired_top1_drop)
            ax.errorbar([c[0] for c in ci], [c[1] for c in ci],
                        yerr=[[max(c[1] - c[2], 0.0) for c in ci],
                              [max(c[3] - c[1], 0.0) for c in ci]],
                        fmt="none", ecolor="0.45", elinewidth=0.9, capsize=3, zorder=2.5,
                        label="paired 95% interval of the drop")
        front = pareto_front([(x, y) for _, x, y in pts])
        fx = [pts[i][1] for i in front]
        fy = [pts[i][2] for i in front]
        ax.plot(fx, fy, "-", color="0.25", lw=1.2, zorder=2, label="Pareto front")
        ax.scatter(fx, fy, s=130, facecolor="none", edgecolor="0.25", lw=1.0, zorder=2)
        ax.set_xscale("log")
        xs = [x for _, x, _ in pts]
        lo, hi = min(xs), max(xs)
        ax.set_xlim(lo / 1.12, hi * 1.25)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        if sentence:
            ax.set_yscale("log")
            ax.axhline(0.01, color="tab:purple", ls="--", lw=1,
                       label="target: cosine 0.99 (1 - cos = 0.01)")
            ax.set_ylabel("1 - mean cosine similarity to the float embeddings\n"
                          "(log scale; lower is better)")
            ys = [y for _, _, y in pts]
            ax.set_ylim(min(ys) / 2.5, max(max(ys), 0.01) * 2.5)
        else:
            ax.axhline(0.0, color="0.6", lw=0.8)
            ax.axhline(1.0, color="tab:purple", ls="--", lw=1, label="1 point below crossbar8")
            ax.set_ylabel(f"top-1 drop from the 8-bit crossbar ({REFERENCE})\n"
                          "(percentage points; lower is better)")
            ys = [y for _, _, y in pts] + [v for c in ci for v in c[2:]]
            lo_y, hi_y = min(min(ys), 0.0), max(max(ys), 1.0)
            if hi_y - lo_y > 8:  # a collapsed row would squash the interesting 0-2 points
                ax.set_yscale("symlog", linthresh=2.0, linscale=1.5)
                ticks = [t for t in (-5, -2, -1, 0, 1, 2, 5, 10, 20, 50, 100)
                         if lo_y - 0.5 <= t <= hi_y * 1.3 + 1]
                ax.yaxis.set_major_locator(FixedLocator(ticks))
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.yaxis.set_minor_locator(NullLocator())
                ax.set_ylim(lo_y - 0.6, hi_y * 1.35 + 0.5)
                ax.set_ylabel(f"top-1 drop from the 8-bit crossbar ({REFERENCE})\n"
                              "(percentage points, linear below 2, log above; lower is better)")
            else:
                span = max(hi_y - lo_y, 2.0)
                ax.set_ylim(lo_y - 0.08 * span, hi_y + 0.1 * span)
        ax.set_xlabel("reduction of memristor writes per pass against the unsorted baseline "
                      "(log scale; higher is better)")
        ax.grid(True, which="major", color="0.9", lw=0.6)
        leg = ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                        fontsize=8, framealpha=0.9)
        if title:
            ax.set_title(title, fontsize=10)
        fig.tight_layout()
        fig.canvas.draw()
        lb = leg.get_window_extent(fig.canvas.get_renderer())
        xy_px = [tuple(ax.transData.transform((x, y))) for _, x, y in pts]
        _place_labels(ax, xy_px, [r["name"] for r, _, _ in pts], fontsize=7.5,
                      obstacles=[(lb.x0, lb.y0, lb.x1, lb.y1)])
    return fig
