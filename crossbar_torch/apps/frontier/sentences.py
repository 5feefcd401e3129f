"""The sentences a sentence model is scored and calibrated on: the real English corpora that
ship with the package (:func:`builtin_sentences` to score, :func:`calibration_corpus` for rule
21's input moments), generated ones (:func:`frontier_sentences`) and a user's file
(:func:`read_sentences`); :func:`feedback_sentences` picks rule 21's calibration set."""
from __future__ import annotations

import math
import os
from typing import List

from .errors import FrontierError

CALIBRATION_SENTENCES = 32   # sentences that set the analog ranges (rule 20)
# Rule 21's calibration (feedback_sentences): the first 256 of the packaged calibration corpus
# by default; "generated" gives the 128 generated sentences the figures before 2026-12-05 used.
FEEDBACK_SOURCES = ("corpus", "generated")
FEEDBACK_SENTENCES = {"corpus": 256, "generated": 128}
GAIN_SENTENCES = 64  # rule 26's output gains: the first of the calibration sentences
# "corpus:K": the corpus's K-th block of 256 (K = 1 is "corpus"): the disjoint calibration
# draws a preset is checked on (nothing stuck, its seed draws nothing: the text is what varies)
CORPUS_DRAW_PREFIX = "corpus:"
CALIBRATION_CORPUS = "corpus/calibration_en.txt"  # package data; sources: corpus/README.md

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


def feedback_sentences(n: int = None, source: str = "corpus") -> List[str]:
    """Rule 21's calibration sentences, none of which a default evaluation set holds:

    * ``"corpus"`` (default): the first ``n`` (default 256) of :func:`calibration_corpus`, real
      English from the docstrings of Python's standard library. The input moments of real
      text fit real text better than those of templates: on mpnet's policies the embedding
      error (1 - cos) fell by 39% to 63% (docs/transformers.md, "Calibration text");
    * ``"generated"``: the ``n`` (default 128) generated sentences after the first 1024 of
      :func:`frontier_sentences` (MiniLM is scored on the first 256 by default);
    * ``"corpus:K"``: the corpus's ``K``-th block of 256 (``n`` of them from the block's start;
      ``"corpus:1"`` is ``"corpus"``): lines 257-512 for ``K = 2``, 513-768 for ``K = 3``;
    * any other string: a text file, one sentence a line (:func:`read_sentences`), its first
      ``n`` (all by default).

    Raises :class:`FrontierError` (one line) for a bad file or an ``n`` the source lacks."""
    if n is not None and n < 1:
        raise FrontierError(f"calibration: the number of sentences must be >= 1, got {n}")
    draw = corpus_draw(source)
    if draw is not None:
        text, block = calibration_corpus(), FEEDBACK_SENTENCES["corpus"]
        draws = len(text) // block
        if not 1 <= draw <= draws:
            raise FrontierError(f"calibration: {source!r}: the corpus holds {draws} draws of "
                                f"{block} sentences, corpus:1 to corpus:{draws}")
        n = block if n is None else n
        start = (draw - 1) * block
        if start + n > len(text):
            raise FrontierError(f"calibration: {n} sentences asked from line {start + 1} of "
                                f"the corpus ({source!r}); it holds {len(text)}")
        return text[start:start + n]
    if source == "generated":
        n = FEEDBACK_SENTENCES["generated"] if n is None else n
        if 1024 + n > 4096:
            raise FrontierError(f"calibration: at most {4096 - 1024} generated sentences, got {n}")
        return frontier_sentences(1024 + n)[1024:]
    text = (calibration_corpus() if source == "corpus"
            else read_sentences(source, flag="--calibration", minimum=1))
    n = (FEEDBACK_SENTENCES["corpus"] if source == "corpus" else len(text)) if n is None else n
    if n > len(text):
        raise FrontierError(f"calibration: {n} sentences asked, {source!r} holds {len(text)}")
    return text[:n]


def corpus_draw(source: str):
    """``K`` of a ``"corpus:K"`` source (an int, checked by :func:`feedback_sentences`), None
    for any other source. ``"corpus:"`` followed by anything but digits is refused: it is a
    mistyped draw, not a file name."""
    if not source.startswith(CORPUS_DRAW_PREFIX):
        return None
    k = source[len(CORPUS_DRAW_PREFIX):]
    if not (k.isascii() and k.isdigit()):
        raise FrontierError(f"calibration: {source!r}: a corpus draw is corpus:K with K a "
                            "whole number (corpus:1 is the default corpus)")
    return int(k)


def is_packaged_source(source: str) -> bool:
    """Whether ``source`` names packaged or generated sentences rather than a file."""
    return source in FEEDBACK_SOURCES or source.startswith(CORPUS_DRAW_PREFIX)


def calibration_corpus() -> List[str]:
    """The 768 real English sentences rule 21 calibrates on by default
    (``crossbar_torch/corpus/calibration_en.txt``: sentences of the docstrings of Python's
    standard library, none of them in :func:`builtin_sentences`; corpus/README.md)."""
    return _package_lines(CALIBRATION_CORPUS)


def _package_lines(name: str) -> List[str]:
    import importlib.resources
    text = (importlib.resources.files("crossbar_torch") / name).read_text("utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


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
    return _package_lines(BUILTIN_SENTENCES)


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

