"""Give freed host memory back to the operating system between the layers of a model-wide pass
(conversion, programming): issue 19's "N configurations hold the peak of one".

Converting and programming a layer allocates and frees a few tensors the size of its cells
(tens of MB on ViT-Base). glibc serves such blocks from mmap at first, then raises its mmap
threshold to the size of the blocks freed (up to 32 MB), after which they come from the heap;
freed heap memory stays in the process, fragmented, and the next layer's blocks do not fit
the holes. Measured on ViT-Base with compensation (``benchmarks/bench_memory.py --cases comp``):
a peak of 4.07 GiB, of which 1.5 GiB was free heap (2.57 GiB with a fixed mmap threshold).
``malloc_trim(0)`` after each layer returns the free pages (madvise) without changing the
allocator's policy for the rest of the user's process. Elsewhere than glibc: nothing to do.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_freed = [0]  # bytes said freed since the last trim


def release_free_memory(freed: int = 1 << 62) -> None:
    """Return the free pages of the C heap to the OS (glibc ``malloc_trim(0)``; a no-op where
    there is none) once the callers have said ``freed`` bytes were freed since the last time,
    at least 128 MiB: a trim costs ~10 ms on a heap of a few GB (it walks it), and a few
    hundred of them were 14% of a ViT-Base conversion."""
    _freed[0] += freed
    if _freed[0] < TRIM_AFTER_BYTES:
        return
    _freed[0] = 0
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


TRIM_AFTER_BYTES = 1 << 27
