"""Keep freed memory at the top of the heap for the next request: glibc's M_TOP_PAD.

glibc hands the top of a heap back to the kernel as soon as more than ~128 KB of
it is free. A process that allocates and frees a few MB of numpy temporaries per
request (the hash model: ~40 arrays of ~0.5 MB for 64 texts) then has the kernel
map and zero fresh pages on every request: measured, half of hash-384's CPU went to
page faults (bench/RESULTS.md section 17). A pad keeps that much free memory mapped
at the top of each heap, so the same pages serve request after request. The cost is
at most the pad per malloc arena, held only once used.

Setting any threshold stops glibc from adapting the others, so the mmap threshold
is set too, to the largest glibc takes: otherwise it would stay at 128 KB, and every
temporary above that would be mapped and unmapped per request (a batch of 512 texts
faulted twice as many pages with the pad alone as with neither).

Elsewhere (macOS, musl, Windows) there is no `mallopt`, and this does nothing.
"""

from __future__ import annotations

import ctypes

__all__ = ["PAD_BYTES", "keep_heap_pad"]

PAD_BYTES = 16 << 20  # above a request's temporaries at the default batch sizes
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's most on 64-bit: larger blocks are mapped
_M_TOP_PAD = -2  # malloc.h
_M_MMAP_THRESHOLD = -3


def keep_heap_pad(pad_bytes: int = PAD_BYTES) -> bool:
    """Ask the allocator to keep `pad_bytes` free at the top of each heap, and to
    take blocks below `MMAP_THRESHOLD_BYTES` from the heap; returns whether it agreed
    (False where the C library has no `mallopt`)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # TypeError: Windows wants a name
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mapped = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    padded = mallopt(_M_TOP_PAD, pad_bytes)
    return bool(mapped and padded)
