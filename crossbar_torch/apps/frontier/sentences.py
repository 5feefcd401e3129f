"""The sentences a sentence model is scored on: the real English corpus that ships with the
package (:func:`builtin_sentences`), generated ones (:func:`frontier_sentences`,
:func:`feedback_sentences`) and a user's file (:func:`read_sentences`)."""
from __future__ import annotations

import math
import os
from typing import List

from .errors import FrontierError

CALIBRATION_SENTENCES = 32   # sentences that set the analog ranges (rule 20)
FEEDBACK_SENTENCES = 128     # generated sentences whose inputs set rule 21's moments

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

