"""The C allocator's settings for this process: a batch's arrays reuse freed memory instead of new pages.

A batch score of a few thousand persons makes dozens of numpy temporaries of a few hundred KB each
(one value per event). glibc's malloc hands blocks that large out as fresh mappings (mmap) or gives
the top of the heap back to the kernel when they are freed (trim), so every temporary is faulted in
page by page again on each call: on this machine that made the features of a 4,000-person batch take
~1.6x as long as with the memory kept (measured in process, on one thread). glibc keeps freed memory per
arena, and gRPC's worker threads get arenas of their own, so what stays resident is up to TRIM_BYTES per
arena in use, in practice about one batch's temporaries (a few MB at 4,000 persons) per worker thread that
scored a batch: far below the pod's limit, but not bounded by TRIM_BYTES alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_BYTES = 32 * 1024 * 1024
TRIM_BYTES = 64 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Set glibc's thresholds (module docstring); False where the C library is not glibc (nothing changes)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): their allocators behave otherwise anyway
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_BYTES))
    if not done:
        log.warning("setting the allocator's thresholds failed; batch scores fault in fresh memory each call")
    return done
