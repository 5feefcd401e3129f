"""What a crossbar layer's caches and checks are keyed by: the identity (a weak reference, never
an id(), which garbage collection can hand to a new tensor) and the version counter of each
tensor they derive from; and an exact digest of a tensor's bytes for a tensor that is another
object than the one recorded."""
from __future__ import annotations

import hashlib

import torch


def tensor_digest(t: torch.Tensor) -> bytes:
    """A digest of a tensor's dtype, shape and bytes (blake2b): equal digests mean equal values
    (bit for bit), short of a hash collision."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    data = t.detach().contiguous()
    if data.numel():
        h.update(data.reshape(-1).view(torch.uint8).cpu().numpy())  # its buffer, not a copy
    return h.digest()


def no_object():
    """A weak reference whose object is gone (what a pickled stamp refers to)."""
    return None


def same_stamp(a: tuple, b: tuple) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, tuple):  # (weakref, version): the same live object, unchanged
            if x[0]() is None or x[0]() is not y[0]() or x[1] != y[1]:
                return False
        elif x != y:
            return False
    return True
