"""Training data order and augmentation seeding: a sampler that can start mid-epoch, a dataset
wrapper that seeds each sample's transform, and the collate function that reports unreadable
images."""
from __future__ import annotations

import random

import numpy as np
import torch

from ..data import BadImage

class ResumableSampler(torch.utils.data.DistributedSampler):
    """``DistributedSampler`` (also for a single process) that yields ``(index, sample_seed)``
    pairs and can start mid-epoch (``set_position``). ``sample_seed`` is a pure function of
    ``(seed, epoch, position in the epoch's global order)``, used by :class:`SeededDataset`."""

    def __init__(self, dataset, *, num_replicas=1, rank=0, shuffle=True, seed=0,
                 drop_last=False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=drop_last)
        self.position = 0

    def set_position(self, position: int) -> None:
        """Skip the first ``position`` samples (of this rank) of the current epoch."""
        self.position = int(position)

    def __iter__(self):
        indices = list(super().__iter__())  # this rank's share: indices[rank::num_replicas]
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_003
        for i in range(self.position, len(indices)):
            global_pos = i * self.num_replicas + self.rank
            yield (indices[i], (base + global_pos) % (2 ** 63))

    def __len__(self):
        return max(0, self.num_samples - self.position)


def collate_train(items):
    """Training ``collate_fn``: ``(images, labels, bad)``; unreadable images
    (:class:`~crossbar_torch.apps.data.BadImage` records) are taken out of the batch and listed in
    ``bad``, so they reach the training process (even from DataLoader workers), which stops
    with an error naming the file or skips them (``skip_bad``). ``images`` is None when every
    item was bad."""
    from torch.utils.data import default_collate
    good = [it for it in items if not isinstance(it, BadImage)]
    bad = [it for it in items if isinstance(it, BadImage)]
    if not good:
        return None, None, bad
    x, y = default_collate(good)
    return x, y, bad


class SeededDataset(torch.utils.data.Dataset):
    """Wraps a dataset whose items are ``(image, label, ...)``; ``dataset[(index, seed)]`` runs
    the wrapped ``__getitem__`` (and so its random augmentation) with python, numpy and torch
    seeded from ``seed``, restoring the caller's RNG states afterwards. Returns
    ``(image, label)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            index, seed = key
        else:
            index, seed = key, None
        if seed is None:
            item = self.dataset[index]
        else:
            py, npst = random.getstate(), np.random.get_state()
            with torch.random.fork_rng(devices=[]):
                random.seed(seed)
                np.random.seed(seed % 2 ** 32)
                torch.manual_seed(seed)
                try:
                    item = self.dataset[index]
                finally:
                    random.setstate(py)
                    np.random.set_state(npst)
        if isinstance(item, BadImage):  # an unreadable image (skip_bad dataset): the
            return item                 # collate function reports or skips it
        if isinstance(item, (tuple, list)):
            image = item[0]
            label = item[1] if len(item) > 1 else -1
        else:
            image, label = item, -1
        return image, torch.as_tensor(label if label is not None else -1, dtype=torch.long)
