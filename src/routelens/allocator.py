"""Freed tensor memory stays in the process for the next tensor (glibc only).

glibc's malloc serves every block above its mmap threshold (128 KiB, rising with use up
to 32 MiB) with a fresh mmap and gives it back with munmap when freed, so every new large
tensor page-faults its pages in again and the kernel zeroes them. The scoring engines
allocate and free tensors of tens to hundreds of MiB many times a second on CPU: on the
demo's isolation study those page faults were 10 s of system time in an 18 s run.
Raising the mmap and trim thresholds keeps freed blocks in the heap for the next tensor,
as jemalloc or tcmalloc do for PyTorch services. What it costs: the process keeps up to
`TRIM_THRESHOLD` of free memory at its heap's top instead of returning it, so its peak
resident size can stay resident (the engines' memory budget still bounds the peak).

`routelens` commands call `keep_freed_memory()` before any work; a program using the API
may call it too. ROUTELENS_MALLOC=system leaves malloc as it is. The setting applied is
recorded in every run's run.json (`allocator`).
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["keep_freed_memory", "allocator_state", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

MMAP_THRESHOLD = 1 << 30   # bytes: blocks below this come from the heap, and are reused there
TRIM_THRESHOLD = 1 << 30   # bytes of free memory at the heap's top kept before returning it
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # mallopt's parameter numbers (malloc.h)

_state: dict = {"malloc": "system", "why": "keep_freed_memory() was not called"}


def allocator_state() -> dict:
    """What `keep_freed_memory` did in this process (for run.json)."""
    return dict(_state)


def keep_freed_memory() -> dict:
    """Set glibc's mmap and trim thresholds (once per process; idempotent); returns the
    state recorded in run.json. Elsewhere (macOS, musl) or with ROUTELENS_MALLOC=system,
    nothing changes and the state says why.

    Examples:
        >>> import routelens as rl
        >>> state = rl.keep_freed_memory()      # before the work, once per process
        >>> state["malloc"] in ("glibc-kept", "system")
        True
        >>> rl.keep_freed_memory() == state     # a second call changes nothing
        True
    """
    global _state
    if _state.get("malloc") == "glibc-kept":
        return dict(_state)
    if os.environ.get("ROUTELENS_MALLOC", "").lower() == "system":
        _state = {"malloc": "system", "why": "ROUTELENS_MALLOC=system"}
    elif platform.libc_ver()[0] != "glibc":
        _state = {"malloc": "system", "why": f"not glibc ({platform.system()})"}
    else:
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):
            _state = {"malloc": "system", "why": "glibc's mallopt not found"}
        else:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            done = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            _state = ({"malloc": "glibc-kept", "mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD}
                      if done else {"malloc": "system", "why": "glibc refused the thresholds"})
    return dict(_state)
