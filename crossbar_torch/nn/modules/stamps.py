"""What a crossbar layer's caches and checks are keyed by: the identity (a weak reference, never
an id(), which garbage collection can hand to a new tensor) and the version counter of each
tensor they derive from; and an exact digest of a tensor's bytes for a tensor that is another
object than the one recorded; and ``ProgrammedWeight``, a crossbar layer's record of the latent
weight its crossbars were programmed with."""
from __future__ import annotations

import hashlib
import weakref

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


class ProgrammedWeight:
    """Whether a crossbar layer's latent weight (``self.weight``) is still the one its crossbars
    were programmed with (``_programmed_version``, ``_programmed_digest``, set in its
    constructor)."""

    # The version counter says when the weight changed in place; it is compared only for the
    # same tensor object, held by a weak reference (an id() can be reused after garbage
    # collection). deepcopy, .to() and load_state_dict give new objects with fresh counters:
    # then a digest of the bytes (exact) decides, once, and the new object's counter is
    # followed. Inference tensors cannot change outside inference_mode: they are not checked.
    def _weight_stamp(self):
        w = self.weight
        if w.is_inference():
            return None
        return weakref.ref(w), w._version

    def _weight_digest(self) -> bytes | None:
        if self.weight.is_meta:  # no values to compare
            return None
        return tensor_digest(self.weight)

    def _mark_programmed(self) -> None:
        before, now = self._programmed_version, self._weight_stamp()
        # the same tensor at the same version as at the last mark: the same bytes, whose digest
        # is at hand (a reprogramming of ViT-Base hashed its 85M weights again, 0.35 s)
        if (now is None or before is None or before[0]() is not self.weight
                or before[1] != now[1] or self._programmed_digest is None):
            self._programmed_digest = self._weight_digest()
        self._programmed_version = now
        self._stale_warned = False

    def _weight_changed(self) -> bool:
        # inside a compiled graph the check would cost a graph break per layer: there it is
        # made when the model is switched to eval (``train(False)``, eager), see ``train``
        if self._programmed_version is None or torch.compiler.is_compiling():
            return False
        now = self._weight_stamp()
        if now is None:
            return False
        if self._programmed_version[0]() is self.weight:
            return now[1] != self._programmed_version[1]
        # another tensor object: compare values, then follow the new object's counter
        digest = self._weight_digest()
        changed = (digest is not None and self._programmed_digest is not None
                   and digest != self._programmed_digest)
        if not changed:
            self._programmed_version = now
        return changed
