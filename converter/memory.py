"""Hand freed memory back to the operating system between the parts of a long job.

glibc keeps freed blocks below its mmap threshold in its arenas for reuse; a job that
frees one decoder layer's (or one tensor's) buffers and then allocates the next one's,
with worker threads in their own arenas, ends up holding several parts' worth of freed
memory. Measured on the 1.7B parity check: 2.5 GB peak RSS without trimming, 0.8 GB
with ``malloc_trim(0)`` after each layer, for the same wall time (a lower mmap threshold
gave the same peak but was 30% slower: every buffer became fresh zeroed pages).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache
from typing import Callable


@lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


def release_free_memory() -> None:
    """``malloc_trim(0)`` where the C library has it (glibc); a no-op elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
