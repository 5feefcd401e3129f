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
The float model's outputs are computed once and reused by every row (and kept beside the CSV, keyed by model,
weights and data, so a resumed run does not recompute them). :func:`plot_frontier` draws
reduction (x, log scale) against the drop (y) with the Pareto front marked.

Under ``torchrun`` every rank scores its share of the data and rank 0 writes the same files as
one process (:mod:`.shard`).

Modules, one job each: :mod:`.sentences` (the sentence sets), :mod:`.sweeps` (the runs and the
reference row), :mod:`.metrics` (weight error, Pareto front, paired drop, sentence fidelity),
:mod:`.scorers` (image and sentence scorers, the float-output cache), :mod:`.shard` (torchrun),
:mod:`.store` (CSV / JSON, resuming), :mod:`.run` (the loop), :mod:`.plot` (the figure).
"""

from __future__ import annotations

from ..sweep import SweepRun
from .errors import FrontierError
from .metrics import (Z95, decode_bits, embedding_fidelity, encode_bits, paired_top1_drop,
                      pareto_front, weight_error)
from .plot import draw_frontier, plot_frontier
from .run import run_frontier
from .scorers import CALIBRATION_IMAGES, FloatCache, ImageScorer, SentenceScorer, _hash
from .sentences import (BUILTIN_SENTENCES, CALIBRATION_CORPUS, CALIBRATION_SENTENCES,
                        FEEDBACK_SENTENCES, FEEDBACK_SOURCES, GAIN_SENTENCES,
                        MAX_SENTENCE_CHARS, builtin_sentences, calibration_corpus,
                        feedback_sentences, frontier_sentences, read_sentences)
from .store import REPORT_COLUMNS, SETUP_COLUMN, TAIL_COLUMNS, check_setup, read_previous, \
    write_outputs
from .sweeps import CONFIG_FIELDS, REFERENCE, load_sweeps, reference_config, varying_fields

__all__ = ["REFERENCE", "SweepRun", "frontier_sentences", "builtin_sentences", "read_sentences",
           "BUILTIN_SENTENCES", "embedding_fidelity", "load_sweeps", "reference_config",
           "varying_fields", "weight_error", "pareto_front", "ImageScorer", "SentenceScorer",
           "read_previous", "check_setup", "run_frontier", "plot_frontier", "FrontierError",
           "paired_top1_drop", "encode_bits", "decode_bits", "feedback_sentences",
           "calibration_corpus", "CALIBRATION_CORPUS", "FEEDBACK_SOURCES",
           "draw_frontier", "write_outputs", "FloatCache", "CALIBRATION_IMAGES",
           "CALIBRATION_SENTENCES", "FEEDBACK_SENTENCES", "GAIN_SENTENCES", "CONFIG_FIELDS",
           "SETUP_COLUMN",
           "REPORT_COLUMNS", "TAIL_COLUMNS", "MAX_SENTENCE_CHARS", "Z95"]
