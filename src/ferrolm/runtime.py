"""Process-level tuning the engine applies once when it starts."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

# glibc mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def tune_allocator() -> bool:
    """Keep freed tens-of-MB buffers in the heap for reuse (glibc only).

    glibc serves allocations above its mmap threshold with fresh mmap'd pages, which the
    kernel must fault in and zero on every use: each decode step allocates context-sized
    temporaries (gathered K/V, scores), and page faults made them several times slower
    than the arithmetic. Raising the threshold to 64 MiB keeps those in the heap; larger
    buffers (the KV pool itself) are still mmap'd and go back to the OS when freed.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 64 << 20) == 1
        return bool(libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20) == 1 and ok)
    except (OSError, AttributeError):  # not glibc
        return False
