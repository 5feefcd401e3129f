#!/usr/bin/env python
"""Rebuild crossbar_torch/corpus/sentences_en.txt: real English sentences taken from text that
ships with Python (its language and library reference, its IDLE help) and scikit-learn (its
dataset descriptions) (see crossbar_torch/corpus/README.md for sources, licences
and the versions the committed file was built from); and calibration_en.txt: sentences from the
docstrings of Python's standard library modules, none of which the scored file holds (rule 21's
input moments are measured on them, so the fidelity is measured out of sample).

  python scripts/build_sentence_corpus.py [--out crossbar_torch/corpus/sentences_en.txt]
                                          [--calibration-out .../calibration_en.txt]
                                          [--training-out FILE]

``--training-out`` also writes 1,920 more docstring sentences, in neither file, for sentence
distillation (``scripts/finetune.py --sentences FILE``; not shipped: it is made on demand).

Sentences are cut from prose paragraphs (code blocks and tables skipped, line-wrapping hyphens
rejoined), kept when they are one plain sentence of 8 to 40 words (no markup, code, URLs or
unbalanced brackets), deduplicated (case-insensitive), then a fixed number is taken from each
source at an even stride and the whole list is shuffled with a fixed seed, so that any prefix
mixes both sources. Nothing is downloaded; the output depends only on the installed versions.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import sys

PYTHON_SENTENCES = 220
IDLE_SENTENCES = 85
SKLEARN_SENTENCES = 25
CALIBRATION_SENTENCES = 768  # three disjoint draws of 256 (the scripts take the first 256)
TRAINING_SENTENCES = 1920  # --training-out: distillation text (docs/finetune/RESULTS.md)
SEED = 0
# Standard-library folders whose text is not the library's own prose (tests, IDLE, whose help
# the scored file holds, the reference text behind help(), vendored or generated code).
_SKIP_DIRS = {"test", "tests", "idlelib", "pydoc_data", "site-packages", "lib2to3", "ensurepip",
              "turtledemo", "__pycache__", "config-3.11-x86_64-linux-gnu", "encodings"}
_BAD = re.compile(r"[\"=_`\[\]{}<>|\\@#$%^~*/:;]|\.\.|\be\.g\b|\bi\.e\b|\betc\.|\bSee\b|\bsee\b"
                  r"|\bPEP\b|https?|www\.|\bFig\b|\bNo\.|\bvs\.")
_CITATION = re.compile(r"\b(19|20)\d\d\)?\.$|\bet\.? al|\bRep\b|University|Institute|Technical Report")


def paragraphs(text: str):
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if any(ln.startswith("     ") or ">>>" in ln or ln.strip().startswith(("-", "=", ":", ".."))
               for ln in lines):
            continue  # code, tables, field lists, rst directives
        para = " ".join(ln.strip() for ln in lines)
        yield re.sub(r"(\w)- (\w)", r"\1-\2", para)  # "comma- separated" -> "comma-separated"


def sentences(text: str):
    out, seen = [], set()
    for para in paragraphs(text):
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", para):
            s = s.strip()
            words = s.split()
            if not (8 <= len(words) <= 40 and 50 <= len(s) <= 220):
                continue
            if not re.match(r"^[A-Z][a-z]", s) or not s.endswith("."):
                continue
            if re.match(r"^[A-Z][a-z]+ [A-Z][a-z]+ ", s):  # a heading run into its sentence
                continue
            if _BAD.search(s) or s.count("(") != s.count(")"):
                continue
            if sum(ch.isdigit() for ch in s) > 8 or _CITATION.search(s):
                continue
            if sum(w[:1].isupper() for w in words) > 0.4 * len(words):  # names, titles
                continue
            if s.lower() in seen:
                continue
            seen.add(s.lower())
            out.append(s)
    return out


def idle_help_text() -> str:
    """The paragraphs of IDLE's help (idlelib/help.html), tags removed."""
    import html
    import idlelib
    path = os.path.join(os.path.dirname(idlelib.__file__), "help.html")
    with open(path, encoding="utf-8") as f:
        page = f.read()
    page = page[page.find("<body"):]
    return "\n\n".join(html.unescape(re.sub(r"<[^>]+>", "", para))
                       for para in re.findall(r"<p>(.*?)</p>", page, re.S))


def stdlib_docstrings() -> str:
    """The docstrings (module, class, function) of the standard library's Python files, in
    sorted path order, read with ``ast`` (nothing is imported or run)."""
    import ast
    import sysconfig
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(f for f in files if f.endswith(".py")):
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a file written for another Python, or not UTF-8
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                     ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        docs.append(doc)
    return "\n\n".join(docs)


def stride(items, n):
    if len(items) < n:
        raise SystemExit(f"only {len(items)} candidate sentences, need {n}")
    return [items[(i * len(items)) // n] for i in range(n)]


def write_lines(path: str, lines) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)  # atomic: the old file or the new one, never half of one


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "crossbar_torch", "corpus", "sentences_en.txt"))
    p.add_argument("--calibration-out", default=None,
                   help="the calibration file (default: calibration_en.txt beside --out)")
    p.add_argument("--training-out", default=None,
                   help=f"also write {TRAINING_SENTENCES} docstring sentences in neither file "
                        "(distillation text for scripts/finetune.py --sentences)")
    args = p.parse_args(argv)
    for path in (args.out, args.calibration_out, args.training_out):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
            print(f"error: {path}: folder {folder} does not exist or is not writable",
                  file=sys.stderr)
            return 2
    import pydoc_data.topics as topics
    import sklearn
    descr = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "descr")
    py_text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    sk_text = "\n\n".join(open(os.path.join(descr, f), encoding="utf-8").read()
                          for f in sorted(os.listdir(descr)) if f.endswith(".rst"))
    out = []
    for text, n in ((py_text, PYTHON_SENTENCES), (idle_help_text(), IDLE_SENTENCES),
                    (sk_text, SKLEARN_SENTENCES)):
        taken = {t.lower() for t in out}
        out += stride([s for s in sentences(text) if s.lower() not in taken], n)
    random.Random(SEED).shuffle(out)
    write_lines(args.out, out)
    scored = {t.lower() for t in out}
    docstrings = [s for s in sentences(stdlib_docstrings()) if s.lower() not in scored]
    calib = stride(docstrings, CALIBRATION_SENTENCES)
    if args.training_out:  # before the shuffle below: the same set either way
        taken = {t.lower() for t in calib}
        train = stride([s for s in docstrings if s.lower() not in taken], TRAINING_SENTENCES)
        random.Random(SEED + 1).shuffle(train)
        write_lines(args.training_out, train)
        print(f"{args.training_out}: {len(train)} sentences for distillation, in neither file")
    random.Random(SEED).shuffle(calib)
    calib_out = args.calibration_out or os.path.join(os.path.dirname(args.out),
                                                     "calibration_en.txt")
    write_lines(calib_out, calib)
    print(f"{calib_out}: {len(calib)} sentences from the docstrings of Python "
          f"{sys.version.split()[0]}'s standard library")
    print(f"{args.out}: {len(out)} sentences ({PYTHON_SENTENCES} + {IDLE_SENTENCES} from Python "
          f"{sys.version.split()[0]}, {SKLEARN_SENTENCES} from scikit-learn {sklearn.__version__})")


if __name__ == "__main__":
    sys.exit(main())
