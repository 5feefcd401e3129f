"""Rule 21's calibration sentences on the command line: ``--calibration SOURCE`` (and
``--calib-sentences N``) for the scripts that program a sentence model from input moments
(frontier, reprogram_report, allocate, finetune)."""
from __future__ import annotations

import argparse
import os

from ..errors import UsageError, UserInputError
from .cli import _int_at_least, check_input_file


def add_calibration_args(p: argparse.ArgumentParser, count: bool = True) -> None:
    """--calibration SOURCE (and --calib-sentences N): rule 21's calibration sentences for a
    sentence model (:func:`calibration_sentences`)."""
    g = p.add_argument_group("rule 21 calibration (sentence models, feedback: hessian)")
    g.add_argument("--calibration", default="corpus", metavar="SOURCE",
                   help="the sentences whose layer inputs set rule 21's input moments (never "
                        "the ones scored): 'corpus' (default: 256 real sentences packaged in "
                        "crossbar_torch/corpus/calibration_en.txt), 'corpus:K' (its K-th block "
                        "of 256, K = 1 to 3: the disjoint draws presets are checked on), "
                        "'generated' (128 generated "
                        "sentences, as the figures before 2026-12-05), or a UTF-8 text file, "
                        "one sentence a line (text like the text the model will embed)")
    if count:
        g.add_argument("--calib-sentences", type=_int_at_least(1), metavar="N",
                       help="how many of them (default: 256 of the corpus, 128 generated, "
                            "all of a file)")


def calibration_sentences(args) -> list:
    """The sentences ``--calibration`` / ``--calib-sentences`` name; a missing or unreadable
    file, or more sentences than the source holds, is one ``error:`` line."""
    from .frontier.sentences import feedback_sentences, is_packaged_source
    if not is_packaged_source(args.calibration):
        check_input_file(args.calibration, "--calibration")
    n = getattr(args, "calib_sentences", None)
    try:
        return feedback_sentences(n, args.calibration)
    except UserInputError as e:  # e.g. more sentences asked than the source holds
        if str(e).startswith("--calibration"):  # read_sentences named the file
            raise
        what = f"--calibration {args.calibration}" + (f" --calib-sentences {n}" if n else "")
        raise UsageError(f"{what}: {e}") from None


def refuse_for_images(args, instead: str) -> None:
    """``--calibration`` given with an image model: one line saying what that model uses
    ``instead`` (rule 21's calibration sentences are for sentence models)."""
    if args.calibration != "corpus":
        raise UsageError(f"--calibration is for sentence models (--model minilm or mpnet); "
                         f"--model {args.model} {instead}")


def calibration_setup(args, sentences) -> dict:
    """What a result was calibrated on (for a CSV's setup / a JSON's meta)."""
    from .frontier.scorers import _hash
    from .frontier.sentences import is_packaged_source
    source = (args.calibration if is_packaged_source(args.calibration)
              else os.path.abspath(args.calibration))
    return {"source": source, "sentences": len(sentences), "sha256": _hash(sentences)}
