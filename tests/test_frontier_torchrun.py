"""The frontier under torchrun (issue 19): each configuration's images (sentences) are split
across the ranks by batch, every item scored once, and rank 0 alone writes the same CSV / JSON
/ PNG as one process. Checked with the gloo backend on the CPU: scripts/frontier.py under
``torch.distributed.run`` with 2 ranks against one process (the CSV byte for byte but for the
two timing columns), and the library under 3 spawned ranks, where one rank has no batch, for
images and for sentences (embeddings gathered in sentence order)."""
from __future__ import annotations

import csv
import io
import json
import os
import sys

import pytest
import torch
import torch.distributed as dist

import crossbar_torch.apps.frontier as fr
from conftest import REPO
from crossbar_torch.apps.frontier.shard import BatchShard

SCRIPT = os.path.join(REPO, "scripts", "frontier.py")
TIMING = ("convert_seconds", "eval_seconds")  # wall-clock: the only columns that may differ
SWEEP = """base: {rows: 16, cols: 32, sort: none, seed: 0}
runs:
  - {name: crossbar8}
  - {name: value 2@0.5, sort: value, stuck_slices: 2, reprogram_fraction: 0.5}
  - {name: adc6, sort: value, input_bits: 8, adc_bits: 6, adc_range: calibrated}
"""


def without_timing(text: str) -> str:
    """The CSV with the timing columns blanked (every other byte kept)."""
    rows = list(csv.reader(io.StringIO(text)))
    idx = [rows[0].index(c) for c in TIMING]
    for r in rows[1:]:
        for i in idx:
            r[i] = ""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def without_seconds(obj):
    if isinstance(obj, dict):
        return {k: without_seconds(v) for k, v in obj.items() if not k.endswith("seconds")}
    if isinstance(obj, list):
        return [without_seconds(v) for v in obj]
    return obj


def test_batch_shard_gives_every_item_once_and_empty_shards():
    for n, b, world in [(7, 2, 2), (7, 2, 3), (1, 4, 2), (0, 3, 2), (10, 3, 5)]:
        seen = []
        for r in range(world):
            shard = BatchShard(n, b, r, world)
            got = list(shard)
            assert len(got) == len(shard)
            assert all(batch == list(range(k * b, min(k * b + b, n)))  # the one-process batch
                       for k, batch in zip(shard.batch_numbers, got))
            seen += [i for batch in got for i in batch]
        assert sorted(seen) == list(range(n))


@pytest.mark.slow  # two runs of the script, one of them as two processes: ~2.5 min on 2 cores
def test_script_two_gloo_ranks_write_the_one_process_csv(tmp_path):
    from test_eval import make_folder
    make_folder(tmp_path / "val", n_good=7)  # batches of 2: rank 0 gets 0, 2; rank 1 gets 1, 3
    sweep = tmp_path / "s.yaml"
    sweep.write_text(SWEEP)
    common = ["--model", "test_efficientnet", "--random-init", "--img-size", "32",
              "--crop-pct", "1.0", "--workers", "0", "--batch-size", "2", "--device", "cpu",
              "--quiet", "--data", str(tmp_path / "val"), "--sweep", str(sweep),
              "--calib-images", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = {}
    for name, cmd in (("one", [sys.executable, SCRIPT]),
                      ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node", "2", SCRIPT])):
        import subprocess
        d = tmp_path / name
        r = subprocess.run(cmd + common + ["--csv", str(d / "f.csv")], capture_output=True,
                           text=True, timeout=600, cwd=REPO, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[name] = (d, r)
    one, two = outs["one"][0], outs["two"][0]
    a, b = (one / "f.csv").read_text(), (two / "f.csv").read_text()
    assert without_timing(a) == without_timing(b)
    assert a != without_timing(a)  # the timing columns were there (and blanked)
    rows = list(csv.DictReader(io.StringIO(a)))
    assert [r["name"] for r in rows] == ["crossbar8", "value 2@0.5", "adc6"]
    assert all(r["images"] == "7" for r in rows)
    ja, jb = (json.loads((d / "f.json").read_text()) for d in (one, two))
    assert without_seconds(ja) == without_seconds(jb)
    assert (one / "f.png").read_bytes() == (two / "f.png").read_bytes()
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))  # rank 1 wrote nothing else
    assert outs["two"][1].stdout.count("crossbar8") == 1  # rank 0 alone prints the table


# --------------------------------------------------------------------------- spawned ranks


def _sentence_features(s: str) -> torch.Tensor:
    v = torch.zeros(16)
    for i, ch in enumerate(s):
        v[(ord(ch) + i) % 16] += 1.0
    return v


def _toy_encode(model, sentences):
    return model(torch.stack([_sentence_features(s) for s in sentences]))


def _counter(float_model, seen: dict, what: str):
    """A forward hook counting the items ``float_model`` itself runs on (its converted copies
    carry the hook too: they are not counted)."""
    def hook(m, inp, out):
        if m is float_model:
            seen[what] += inp[0].shape[0]
    return hook


def _frontier(out: str, root: str, sweep: str, rank: int) -> None:
    """Images and sentences through run_frontier; rank ``rank`` names its files."""
    from test_frontier import tiny_model, to_tensor

    from crossbar_torch.apps.data import ImageNetFolder, collate_skip_bad
    from crossbar_torch.apps.frontier.shard import shard_loader
    runs = fr.load_sweeps([sweep])
    seen = {"images": 0, "sentences": 0}  # what the float models score on this rank
    ds = ImageNetFolder(root, to_tensor, skip_bad=True)
    scorer = fr.ImageScorer(shard_loader(ds, 2, collate_fn=collate_skip_bad), "cpu",
                            key={"t": 1}, calib_images=3)
    float_model = tiny_model()
    float_model.register_forward_hook(_counter(float_model, seen, "images"))
    fr.run_frontier(float_model, runs, scorer, csv_path=f"{out}/img{rank}.csv",
                    float_cache=f"{out}/img{rank}.float.pt")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Tanh(), torch.nn.Linear(24, 8))
    sentences = fr.frontier_sentences(9)  # batches of 2: 5 batches over 3 ranks
    model.register_forward_hook(_counter(model, seen, "sentences"))
    fr.run_frontier(model, runs[:2], fr.SentenceScorer(sentences, batch_size=2,
                                                       encode=_toy_encode),
                    csv_path=f"{out}/sent{rank}.csv")
    with open(f"{out}/seen{rank}.json", "w") as f:
        json.dump(seen, f)


def _rank_main(rank: int, world: int, store: str, out: str, root: str, sweep: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        _frontier(out, root, sweep, rank)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # three processes importing torch: ~1.5 min on 2 cores
def test_three_spawned_ranks_one_without_a_batch(tmp_path):
    """3 images in batches of 2 over 3 ranks: rank 2 scores nothing; 9 sentences in 5 batches.
    Every rank calibrates the analog row on the same first images; only rank 0 writes."""
    from test_frontier import make_folder, tiny_model
    root = make_folder(tmp_path / "val", tiny_model(), n=3)
    sweep = tmp_path / "s.yaml"
    sweep.write_text(SWEEP.replace("rows: 16, cols: 32", "rows: 8, cols: 28"))
    (tmp_path / "one").mkdir()
    (tmp_path / "three").mkdir()
    _frontier(str(tmp_path / "one"), str(root), str(sweep), 0)
    torch.multiprocessing.spawn(_rank_main, nprocs=3, join=True,
                                args=(3, str(tmp_path / "store"), str(tmp_path / "three"),
                                      str(root), str(sweep)))
    three = sorted(os.listdir(tmp_path / "three"))
    assert three == ["img0.csv", "img0.float.pt", "seen0.json", "seen1.json", "seen2.json",
                     "sent0.csv"]  # rank 0 alone wrote results
    # the float models scored each rank's batches only: images 0-1 | 2 | none, sentences
    # batches 0, 3 | 1, 4 | 2 (every item once)
    seen = [json.loads((tmp_path / "three" / f"seen{r}.json").read_text()) for r in range(3)]
    assert [s["images"] for s in seen] == [2, 1, 0]
    assert [s["sentences"] for s in seen] == [4, 3, 2]
    for f in ("img0.csv", "sent0.csv"):
        a = (tmp_path / "one" / f).read_text()
        b = (tmp_path / "three" / f).read_text()
        assert without_timing(a) == without_timing(b), f
    rows = list(csv.DictReader(open(tmp_path / "one" / "img0.csv")))
    assert [r["images"] for r in rows] == ["3"] * 3
    # the float cache the 3 ranks wrote serves one process (the same record)
    one = torch.load(tmp_path / "one" / "img0.float.pt", weights_only=True)
    cached = torch.load(tmp_path / "three" / "img0.float.pt", weights_only=True)
    assert one.keys() == cached.keys() and all(torch.equal(one[k], cached[k])
                                               for k in one if k != "key")


@pytest.mark.parametrize("n", [1, 2])
def test_sentence_embeddings_are_gathered_in_sentence_order(n):
    """One process: embed() is the plain batched embedding (the gather is the identity)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4)
    s = fr.frontier_sentences(5 * n)
    got = fr.SentenceScorer(s, batch_size=2, encode=_toy_encode).embed(model)
    want = torch.cat([_toy_encode(model, s[i:i + 2]) for i in range(0, len(s), 2)])
    assert torch.equal(got, want.float())
