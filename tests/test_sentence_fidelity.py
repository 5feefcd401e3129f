"""Fidelity of sentence models (issue 18, item 2): mean / minimum cosine and nearest-neighbour
agreement against a hand computation, the real English corpus that ships with the package,
``read_sentences`` and ``scripts/frontier.py --sentences FILE`` (a bad file is one error line),
and the new columns in the frontier CSV / JSON."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re

import pytest
import torch
import torch.nn as nn

import crossbar_torch.apps.frontier as fr
from conftest import REPO
from test_cli_errors import fails

CORPUS = os.path.join(REPO, "crossbar_torch", "corpus")


# --------------------------------------------------------------------------- the metric


def test_fidelity_by_hand():
    """Float a=(1,0) b=(.6,.8) c=(0,1) d=(-1,0): nearest others b, c, b, c. Crossbar moves b
    to (.8,.6) (cosine .6*.8 + .8*.6 = .96) and scales d by 2 (cosine 1: the metric
    normalizes): b's nearest becomes a (.8 > .6), the others keep theirs: 3 of 4 agree."""
    ref = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    emb = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-2.0, 0.0]], dtype=torch.float64)
    f = fr.embedding_fidelity(ref, emb)
    assert f["cosine_mean"] == pytest.approx((1 + 0.96 + 1 + 1) / 4, abs=1e-12)
    assert f["cosine_min"] == pytest.approx(0.96, abs=1e-12)
    assert f["nn_agreement_count"] == 3 and f["nn_agreement"] == 75.0
    same = fr.embedding_fidelity(ref, ref * 3)
    assert same["nn_agreement"] == 100.0 and same["cosine_min"] == pytest.approx(1.0)


def test_fidelity_ties_go_to_the_lowest_index():
    """Sentence 0 is equally close to 1 and 2 under the float embeddings (its nearest: 1, the
    lower index); the crossbar moves 2 a little closer, so 0's nearest becomes 2."""
    ref = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    emb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.01, 0.0, 1.0]])
    f = fr.embedding_fidelity(ref, emb)
    # float: 0 -> 1 (tie 1/2), 1 -> 0 (tie 0/2), 2 -> 0 (tie 0/1)
    # crossbar: 0 -> 2 (0.01 > 0), 1 -> 0 (tie 0/2), 2 -> 0 (0.01 > 0)
    assert f["nn_agreement_count"] == 2


def test_fidelity_bad_shapes():
    with pytest.raises(ValueError, match="must be equal"):
        fr.embedding_fidelity(torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="need 2 sentences"):
        fr.embedding_fidelity(torch.ones(1, 2), torch.ones(1, 2))


# --------------------------------------------------------------------------- the corpus


def test_builtin_corpus_real_documented_distinct():
    s = fr.builtin_sentences()
    assert len(s) == 330 and len(set(s)) == 330
    assert all(x == x.strip() and 8 <= len(x.split()) <= 40 for x in s)
    path = os.path.join(CORPUS, "sentences_en.txt")
    with open(path, "rb") as f:
        blob = f.read()
    assert blob.decode("utf-8").splitlines() == s
    readme = open(os.path.join(CORPUS, "README.md"), encoding="utf-8").read()
    assert hashlib.sha256(blob).hexdigest() in readme  # the README describes this file
    for licence in ("PSF License", "BSD 3-Clause"):
        assert licence in readme
    # a real sentence of each source
    assert "Mutable sequences can be changed after they are created." in s
    assert any("IDLE" in x for x in s) and any("dataset" in x for x in s)


def test_corpus_is_package_data():
    import tomllib
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        data = tomllib.load(f)["tool"]["setuptools"]["package-data"]["crossbar_torch"]
    assert "corpus/*.txt" in data and "corpus/*.md" in data


# --------------------------------------------------------------------------- read_sentences


def test_read_sentences_good(tmp_path):
    p = tmp_path / "s.txt"
    p.write_bytes("\ufeffFirst one.\r\n\n   Second, with spaces.   \n\nÜber drei.\nFirst one.\n"
                  .encode("utf-8"))
    assert fr.read_sentences(str(p)) == ["First one.", "Second, with spaces.", "Über drei.",
                                         "First one."]


@pytest.mark.parametrize("case, content, expect", [
    ("missing", None, "--sentences: file not found: '{path}'"),
    ("digits", None, "--sentences takes a file now; --generated N"),
    ("folder", None, "--sentences '{path}' is a folder"),
    ("empty", b"", "--sentences {path}: 0 sentence(s); at least 2 needed"),
    ("blank", b"\n  \n\n", "0 sentence(s)"),
    ("one", b"Only one sentence.\n", "1 sentence(s); at least 2"),
    ("binary", b"PK\x03\x04\x00\x00abc\n", "not UTF-8 text (line 1: NUL byte"),
    ("latin1", "Fine.\nCaf\u00e9 au lait.\n".encode("latin-1"), "not UTF-8 text (line 2"),
    ("long", b"ok line.\n" + b"x" * 10_001 + b"\n", "line 2 has 10,001 characters"),
])
def test_read_sentences_bad(tmp_path, case, content, expect):
    path = tmp_path / ("256" if case == "digits" else f"{case}.txt")
    if case == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    arg = "256" if case == "digits" else str(path)
    cwd = os.getcwd()
    os.chdir(tmp_path / ".." if case == "digits" else cwd)  # "256" does not exist there
    try:
        with pytest.raises(fr.FrontierError) as e:
            fr.read_sentences(arg)
    finally:
        os.chdir(cwd)
    msg = str(e.value)
    assert "\n" not in msg
    assert expect.format(path=str(path)) in msg


# --------------------------------------------------------------------------- the script


@pytest.mark.parametrize("argv, expect", [
    (["--model", "mpnet", "--sentences", "{tmp}/nowhere.txt"],
     "error: --sentences: file not found: '{tmp}/nowhere.txt'"),
    (["--model", "minilm", "--sentences", "{tmp}/bin.txt"],
     "error: --sentences {tmp}/bin.txt: not UTF-8 text"),
    (["--model", "mpnet", "--sentences", "{tmp}/one.txt"],
     "error: --sentences {tmp}/one.txt: 1 sentence(s); at least 2 needed"),
    (["--model", "mpnet", "--generated", "5"], "error: --generated must be in [200, 4096], got 5"),
    (["--model", "mpnet", "--sentences", "{tmp}/one.txt", "--generated", "300"],
     "not allowed with argument"),
    (["--model", "test_efficientnet", "--sentences", "{tmp}/one.txt"],
     "error: --sentences is for sentence models (--model minilm or mpnet)"),
    (["--model", "mpnet", "--data", "{tmp}"], "error: --data is for image models: --model mpnet"),
])
def test_frontier_script_sentences_errors(capsys, tmp_path, argv, expect):
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)))
    (tmp_path / "one.txt").write_text("Just one.\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    line = fails(capsys, "frontier", argv + ["--csv", str(tmp_path / "f.csv"), "--quiet"])
    assert expect.replace("{tmp}", str(tmp_path)) in line
    assert not (tmp_path / "f.csv").exists()


# --------------------------------------------------------------------------- the columns


class _Toy(nn.Module):
    """A "sentence model": bag of character codes -> Linear -> embedding."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 24)

    def forward(self, x):
        return self.proj(x)


def _toy_encode(model, sentences):
    g = torch.Generator().manual_seed(0)
    table = torch.randn(128, 32, generator=g)
    x = torch.stack([table[torch.tensor([ord(c) % 128 for c in s])].mean(0) for s in sentences])
    return model(x)


def test_frontier_rows_have_fidelity_columns(tmp_path):
    torch.manual_seed(0)
    model = _Toy().eval()
    sweep = tmp_path / "s.yaml"
    sweep.write_text("base: {rows: 16, cols: 16, sort: value}\n"
                     "runs:\n  - {name: stuck, stuck_slices: 4, reprogram_fraction: 0.0}\n")
    runs = fr.load_sweeps([str(sweep)])
    sentences = fr.builtin_sentences()[:40]
    scorer = fr.SentenceScorer(sentences, encode=_toy_encode, batch_size=16)
    out = tmp_path / "f.csv"
    rows = fr.run_frontier(model, runs, scorer, csv_path=str(out),
                           json_path=str(tmp_path / "f.json"))
    import crossbar_torch as xb
    ref = _toy_encode(model, sentences).detach()
    for row, run in zip(rows, runs):
        with torch.no_grad():
            emb = _toy_encode(xb.convert(model, run.config), sentences)
        want = fr.embedding_fidelity(ref, emb)
        for k in ("cosine_mean", "cosine_min", "nn_agreement", "nn_agreement_count"):
            assert row[k] == pytest.approx(want[k], abs=1e-12), k
    assert rows[0]["nn_agreement"] == 100.0
    assert rows[1]["nn_agreement"] < 100.0  # 4 stuck slices of 8 move some neighbours
    with open(out, newline="") as f:
        table = list(csv.DictReader(f))
    assert float(table[1]["nn_agreement"]) == rows[1]["nn_agreement"]
    assert int(table[1]["nn_agreement_count"]) == rows[1]["nn_agreement_count"]
    data = json.loads((tmp_path / "f.json").read_text())
    assert data["rows"][1]["nn_agreement"] == rows[1]["nn_agreement"]
    # the script's table prints them
    from test_cli_errors import script
    text = script("frontier").table(rows, fr.SentenceScorer)
    assert re.search(r"cosine_min\s+nn agree %", text)
    assert f"{rows[1]['nn_agreement']:.1f}" in text.splitlines()[-1]


# --------------------------------------------------------------------------- rule 21's calibration


def test_calibration_corpus_real_disjoint_documented():
    c = fr.calibration_corpus()
    assert len(c) == 768 and len({x.lower() for x in c}) == 768
    assert all(x == x.strip() and 8 <= len(x.split()) <= 40 for x in c)
    scored = {x.lower() for x in fr.builtin_sentences()}
    assert not any(x.lower() in scored for x in c)  # the fidelity is measured out of sample
    path = os.path.join(CORPUS, "calibration_en.txt")
    with open(path, "rb") as f:
        blob = f.read()
    assert blob.decode("utf-8").splitlines() == c
    readme = open(os.path.join(CORPUS, "README.md"), encoding="utf-8").read()
    assert hashlib.sha256(blob).hexdigest() in readme
    # real text: a sentence of the standard library's own docstrings, read from the library
    import tempfile
    assert "The return value is the pathname of the directory." in c
    assert ("The return value is the pathname of the directory."
            in " ".join(tempfile.mkdtemp.__doc__.split()))


def test_feedback_sentences_sources(tmp_path):
    corpus = fr.calibration_corpus()
    assert fr.feedback_sentences() == corpus[:256]
    assert fr.feedback_sentences(10) == corpus[:10]
    assert fr.feedback_sentences(768) == corpus
    # the generated ones the figures before 2026-12-05 used: after the first 1024 generated
    assert fr.feedback_sentences(source="generated") == fr.frontier_sentences(1152)[1024:]
    assert fr.feedback_sentences(5, "generated") == fr.frontier_sentences(1029)[1024:]
    p = tmp_path / "mine.txt"
    p.write_text("One sentence of mine.\n\nAnother one.\nA third.\n", encoding="utf-8")
    assert fr.feedback_sentences(source=str(p)) == ["One sentence of mine.", "Another one.",
                                                    "A third."]
    assert fr.feedback_sentences(2, str(p)) == ["One sentence of mine.", "Another one."]
    for n, source, match in ((769, "corpus", "769 sentences asked, 'corpus' holds 768"),
                             (4, str(p), "holds 3"), (0, "corpus", ">= 1, got 0"),
                             (3073, "generated", "at most 3072")):
        with pytest.raises(fr.FrontierError, match=match):
            fr.feedback_sentences(n, source)
    with pytest.raises(fr.FrontierError, match="file not found"):
        fr.feedback_sentences(source=str(tmp_path / "none.txt"))


def test_corpus_draws_are_the_corpus_blocks_of_256():
    """``corpus:K``: the calibration corpus's K-th block of 256 lines (the disjoint draws a
    preset is checked on), ``n`` of them from the block's start; ``corpus:1`` is the default."""
    corpus = fr.calibration_corpus()
    assert len(corpus) == 768
    assert fr.feedback_sentences(source="corpus:1") == fr.feedback_sentences() == corpus[:256]
    assert fr.feedback_sentences(source="corpus:2") == corpus[256:512]
    assert fr.feedback_sentences(source="corpus:3") == corpus[512:768]
    assert fr.feedback_sentences(7, "corpus:3") == corpus[512:519]
    draws = [set(fr.feedback_sentences(source=f"corpus:{k}")) for k in (1, 2, 3)]
    assert not (draws[0] & draws[1] or draws[0] & draws[2] or draws[1] & draws[2])
    for n, source, match in ((None, "corpus:4", "3 draws of 256 sentences, corpus:1 to corpus:3"),
                             (None, "corpus:0", "corpus:1 to corpus:3"),
                             (300, "corpus:3", "300 sentences asked from line 513"),
                             (None, "corpus:two", "corpus:K with K a whole number"),
                             (None, "corpus:", "corpus:K with K a whole number"),
                             (None, "corpus:-1", "corpus:K with K a whole number")):
        with pytest.raises(fr.FrontierError, match=match):
            fr.feedback_sentences(n, source)


def test_calibration_flag_takes_a_corpus_draw_without_looking_for_a_file():
    """The scripts' ``--calibration corpus:K`` is a packaged draw, not a path; a bad draw is
    one usage error naming the flag and the value."""
    import argparse
    from crossbar_torch.apps.cli_calibration import calibration_sentences, calibration_setup
    from crossbar_torch.errors import UserInputError
    args = argparse.Namespace(calibration="corpus:2", calib_sentences=None)
    got = calibration_sentences(args)
    assert got == fr.calibration_corpus()[256:512]
    setup = calibration_setup(args, got)
    assert setup["source"] == "corpus:2" and setup["sentences"] == 256
    assert setup != calibration_setup(argparse.Namespace(calibration="corpus"),
                                      fr.feedback_sentences())
    args = argparse.Namespace(calibration="corpus:3", calib_sentences=257)
    with pytest.raises(UserInputError, match=r"--calibration corpus:3 --calib-sentences 257: "
                                             r"calibration: 257 sentences asked"):
        calibration_sentences(args)
    with pytest.raises(UserInputError, match="--calibration corpus:9: .*corpus:1 to corpus:3"):
        calibration_sentences(argparse.Namespace(calibration="corpus:9", calib_sentences=None))


def test_scorer_calibrates_rule_21_on_its_feedback_sentences():
    """The moments a feedback config is programmed from are those of the scorer's ``feedback``
    sentences (none of the scored ones), computed here by hand from the toy's inputs."""
    import crossbar_torch as xb
    torch.manual_seed(0)
    model = _Toy().eval()
    cfg = xb.CrossbarConfig(rows=16, cols=16, sort="value", feedback="hessian")
    scored, mine = fr.builtin_sentences()[:20], fr.calibration_corpus()[300:340]
    g = torch.Generator().manual_seed(0)
    table = torch.randn(128, 32, generator=g)
    for feedback, want_text in ((mine, mine), (None, fr.feedback_sentences())):
        xm = xb.convert(model, cfg)
        fr.SentenceScorer(scored, encode=_toy_encode, feedback=feedback).calibrate(xm)
        x = torch.stack([table[torch.tensor([ord(c) % 128 for c in s])].mean(0)
                         for s in want_text]).double()
        want = (x.T @ x / len(want_text)).float()
        assert torch.allclose(xm.proj.input_moment[0], want, rtol=1e-5, atol=1e-6)


def test_scorer_measures_rule_26_gains_on_its_first_feedback_sentences():
    """The toy's embedding is its one layer's output, so each probe adds (+-1)^2 = 1 per
    sentence and channel: the gains count the sentences they were measured on (the first
    GAIN_SENTENCES of the scorer's feedback sentences), whatever the crossbars hold."""
    import crossbar_torch as xb
    torch.manual_seed(0)
    cfg = xb.CrossbarConfig(rows=16, cols=16, sort="value", feedback="hessian",
                            write_penalty=1.0, filter_weight="gain", stuck_slices=2,
                            reprogram_fraction=0.0, compensate=True)
    scored, mine = fr.builtin_sentences()[:20], fr.calibration_corpus()[300:340]
    for feedback, rows in ((mine, 40), (None, fr.GAIN_SENTENCES)):
        xm = xb.convert(_Toy().eval(), cfg)
        scorer = fr.SentenceScorer(scored, encode=_toy_encode, feedback=feedback)
        scorer.calibrate(xm)
        assert torch.equal(xm.proj.output_gain, torch.full((24,), float(rows),
                                                           dtype=torch.float64))
        xb.reprogram(xm)  # the gains are what rule 26 programs with


def _corpus_builder():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "build_sentence_corpus", os.path.join(REPO, "scripts", "build_sentence_corpus.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_corpus_builder_writes_training_text_in_neither_file(tmp_path, capsys):
    """--training-out: 1,920 distinct docstring sentences, none scored and none calibrated on,
    and the two corpus files the same as without it (docs/finetune/RESULTS.md section 5)."""
    build = _corpus_builder()
    paths = {k: str(tmp_path / f"{k}.txt") for k in ("s", "c", "t", "s2", "c2")}
    assert not build.main(["--out", paths["s"], "--calibration-out", paths["c"],
                           "--training-out", paths["t"]])
    assert not build.main(["--out", paths["s2"], "--calibration-out", paths["c2"]])
    read = {k: open(p, encoding="utf-8").read().splitlines() for k, p in paths.items()
            if os.path.exists(p)}
    train = read["t"]
    assert len(train) == build.TRAINING_SENTENCES == 1920
    assert len({x.lower() for x in train}) == 1920
    assert all(x == x.strip() and 8 <= len(x.split()) <= 40 for x in train)
    for k in ("s", "c"):
        assert not {x.lower() for x in train} & {x.lower() for x in read[k]}
    assert read["s"] == read["s2"] and read["c"] == read["c2"]
    assert len(read["c"]) == 768 and len(read["s"]) == 330
    capsys.readouterr()
    missing = str(tmp_path / "nowhere" / "t.txt")
    assert build.main(["--out", paths["s"], "--training-out", missing]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and missing in err and "Traceback" not in err
