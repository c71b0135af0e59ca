"""Freed tensor memory stays in the process for the next tensor (glibc >= 2.35).

glibc's malloc serves every block above its mmap threshold (128 KiB, rising with use up
to 32 MiB) with a fresh mmap and gives it back with munmap when freed, so every new large
tensor page-faults its pages in again and the kernel zeroes them. The scoring engines
allocate and free tensors of tens to hundreds of MiB many times a second on CPU, and on
the demo's isolation study the kernel's page-fault work was a large share of the wall
time (tests/runs/test_allocator.py shows the faults go). Raising glibc's mmap and trim
thresholds to 1 GiB keeps freed blocks in the heap for the next tensor, as jemalloc or
tcmalloc do for PyTorch services.

What it costs: freed memory stays with the process instead of going back to the system,
so its resident size stays near its peak until it exits, and freed holes that no later
tensor fits can make that peak higher than without it (the demo's peak resident size,
this tree against an earlier one: docs/measurements.md). glibc before 2.35 refuses thresholds above
32 MiB; there nothing changes and the state says so.

Every `routelens` command calls `keep_freed_memory()` before any work, and so does each Ray
actor that scores; a program using the API may call it too. ROUTELENS_MALLOC=system
leaves malloc as it is. The driver's state is recorded in every run's run.json
(`provenance.allocator`).
"""

from __future__ import annotations

import ctypes
import os
import platform

from routelens.errors import RouteLensError

__all__ = ["keep_freed_memory", "allocator_state", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

MMAP_THRESHOLD = 1 << 30   # bytes: blocks below this come from the heap, and are reused there
TRIM_THRESHOLD = 1 << 30   # bytes of free memory at the heap's top kept before returning it
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # mallopt's parameter numbers (malloc.h)
GLIBC_NEEDED = (2, 35)     # the first glibc that accepts an mmap threshold above 32 MiB (bug 27801)
CHOICES = ("keep", "system")

_state: dict = {"malloc": "system", "why": "keep_freed_memory() was not called"}


def allocator_state() -> dict:
    """What `keep_freed_memory` did in this process (for run.json)."""
    return dict(_state)


def _choice() -> str:
    chosen = os.environ.get("ROUTELENS_MALLOC", "keep").strip().lower() or "keep"
    if chosen not in CHOICES:
        raise RouteLensError(f"ROUTELENS_MALLOC={chosen!r}: use keep (the default: freed memory is reused) or system "
                             "(malloc as it is)")
    return chosen


def keep_freed_memory() -> dict:
    """Set glibc's mmap and trim thresholds (once per process; idempotent); returns the
    state recorded in run.json. Elsewhere (macOS, musl, glibc < 2.35) or with
    ROUTELENS_MALLOC=system nothing changes and the state says why.

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
    libc, version = platform.libc_ver()
    if _choice() == "system":
        _state = {"malloc": "system", "why": "ROUTELENS_MALLOC=system"}
    elif libc != "glibc":
        _state = {"malloc": "system", "why": f"not glibc ({platform.system()} {libc or 'unknown libc'})"}
    elif tuple(int(part) for part in version.split(".")[:2] if part.isdigit()) < GLIBC_NEEDED:
        _state = {"malloc": "system", "why": f"glibc {version} refuses mmap thresholds above 32 MiB (2.35 and later "
                                             "accept them)"}
    else:
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):
            _state = {"malloc": "system", "why": "glibc's mallopt not found"}
        else:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            mmap_set = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            trim_set = mmap_set and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            _state = ({"malloc": "glibc-kept", "mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD}
                      if trim_set else
                      {"malloc": "system" if not mmap_set else "glibc-mmap-only", "why": f"glibc {version} refused the "
                       + ("mmap threshold" if not mmap_set else "trim threshold"),
                       **({"mmap_threshold": MMAP_THRESHOLD} if mmap_set else {})})
    return dict(_state)
