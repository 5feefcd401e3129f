"""``crossbar-finetune --model minilm | mpnet``: distillation of a sentence model on sentences
(the image path's Trainer; :mod:`crossbar_torch.apps.finetune.sentences`).

Trains on ``--sentences FILE`` (one sentence a line) or, by default, on generated sentences
(:func:`crossbar_torch.apps.frontier.frontier_sentences`), never on the packaged real corpus:
that is where the fidelity before and after is measured (mean / min cosine and
nearest-neighbour agreement against the float model, :func:`~crossbar_torch.apps.frontier.
embedding_fidelity`). Writes report_before.json / report_after.json, final.pt and result.json
to --out, as the image path does.
"""
from __future__ import annotations

import os

import crossbar_torch as xb
from crossbar_torch.apps.cli import UsageError, describe_source, model_from_args
from crossbar_torch.apps.cli_calibration import calibration_sentences, calibration_setup

REPORT_KEYS = ("writes_per_pass", "baseline_writes_per_pass", "reduction", "initial_writes")


def check_sentence_args(args) -> None:
    """The image-only flags are refused for a sentence model, one line each."""
    for flag in ("train", "distill_images", "val"):
        if getattr(args, flag, None):
            raise UsageError(f"--{flag.replace('_', '-')} is for image models: --model "
                             f"{args.model} trains on sentences (--sentences FILE)")
    if args.loss and args.loss not in ("cosine", "mse"):
        raise UsageError(f"--loss {args.loss}: --model {args.model} distils sentence "
                         "embeddings; use --loss cosine or --loss mse")
    if args.resume:
        raise UsageError("--resume is for the image path; a sentence run is short: start it "
                         "again")


def _report(model, progress) -> dict:
    rep = xb.reprogram_report(model, progress=progress)
    return rep, {k: rep.to_dict()[k] for k in REPORT_KEYS}


def run_sentences(args, cfg, log, progress: bool, t0: float) -> dict:
    """Convert, calibrate (rules 20 / 21 where the config needs it), score, distil, score
    again, save. Returns the result dict (also written to ``--out/result.json``)."""
    from crossbar_torch.apps import frontier as fr
    from crossbar_torch.apps.finetune import FinetuneArgs, Trainer, set_seed, write_final
    from crossbar_torch.apps.finetune.sentences import (SentenceDataset, SentenceEmbedder,
                                                        TokenCollate, default_train_sentences)
    from crossbar_torch.programming import reprogram
    check_sentence_args(args)
    if args.sentences:
        train = fr.read_sentences(args.sentences, "--sentences", minimum=1)
        source = {"file": os.path.abspath(args.sentences)}
    else:
        train = default_train_sentences()
        source = {"generated": len(train)}
    evaluation = fr.builtin_sentences()
    feedback = calibration_sentences(args)  # rule 21's calibration (--calibration)
    os.makedirs(args.out, exist_ok=True)
    set_seed(args.seed)
    float_model = model_from_args(args).eval()
    loss = args.loss or "cosine"
    log(f"model {args.model} ({describe_source(args)}); {len(train)} training sentences "
        f"({'--sentences' if args.sentences else 'generated'}); fidelity on the "
        f"{len(evaluation)} real sentences of the package corpus; loss {loss}")
    scorer = fr.SentenceScorer(evaluation, feedback=feedback)
    scorer.reference(float_model)
    xmodel = xb.convert(float_model, cfg, progress=progress)
    fed = xb.feedback.needs_moments(xmodel)  # rule 21 at the top level or in layer_overrides
    if cfg.analog or fed:  # rules 20, 21: ranges / moments (--calibration)
        scorer.calibrate(xmodel)
    if fed:
        reprogram(xmodel)
    result = {"model": args.model, "weights": describe_source(args), "config": cfg.to_dict(),
              "loss": loss, "train_sentences": len(train), "train_source": source,
              "eval_sentences": len(evaluation),
              "calibration": calibration_setup(args, feedback),
              "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}}
    rep, result["report_before"] = _report(xmodel, progress)
    rep.to_json(os.path.join(args.out, "report_before.json"))
    result["before"] = scorer.score(xmodel)
    log(f"before  cosine mean {result['before']['cosine_mean']:.4f} min "
        f"{result['before']['cosine_min']:.4f}  nn agreement "
        f"{result['before']['nn_agreement']:.1f}%  reduction "
        f"{result['report_before']['reduction']:.3f}x")
    fargs = FinetuneArgs(
        loss=loss, epochs=args.epochs, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        opt=args.opt, momentum=args.momentum, weight_decay=args.weight_decay, sched=args.sched,
        warmup_steps=args.warmup_steps, grad_clip=args.grad_clip, freeze_bn=False,
        freeze_dropout=True,  # the float teacher runs without dropout: so does the student
        amp=args.amp, seed=args.seed, workers=0, save_every=args.save_every, out_dir=args.out,
        progress=progress, keep=args.keep, freeze_crossbar=args.freeze_crossbar,
        reprogram_every=args.reprogram_every)
    trainer = Trainer(SentenceEmbedder(xmodel), SentenceDataset(train), fargs,
                      teacher=SentenceEmbedder(float_model), config=cfg, model_name=args.model,
                      collate_fn=TokenCollate(float_model), log=log)
    res = trainer.fit()
    result["finetune"] = res.summary()
    log(f"fine-tuned {res.steps} steps in {res.seconds:.0f} s; loss "
        f"{result['finetune']['first_loss']} -> {result['finetune']['last_loss']}; "
        f"{res.stuck_cells_checked:,} stuck cells kept their levels")
    result["after"] = scorer.score(xmodel)
    rep, result["report_after"] = _report(xmodel, progress)
    rep.to_json(os.path.join(args.out, "report_after.json"))
    log(f"after   cosine mean {result['after']['cosine_mean']:.4f} min "
        f"{result['after']['cosine_min']:.4f}  nn agreement "
        f"{result['after']['nn_agreement']:.1f}%  reduction "
        f"{result['report_after']['reduction']:.3f}x")
    write_final(xmodel, args.out, result, t0, log, config=cfg, model_name=args.model)
    return result
