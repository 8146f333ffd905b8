"""Keep a long-running rank's memory flat.

glibc raises its mmap threshold after large blocks are freed (up to 32 MB), after which big temporaries (VAE
activations, attention scores) come from the heap, fragment it and linger: resident memory then creeps up with
stream length even though nothing is kept. Pinning the threshold (and the trim threshold) makes every large
temporary its own mapping, returned to the OS when freed. A no-op where glibc is not the allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def pin_malloc_thresholds(mmap_threshold: int = 1 << 20, trim_threshold: int = 4 << 20) -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
