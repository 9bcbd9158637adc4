"""Memory probes: NumPy allocations (tracemalloc) and the process's resident memory.

:func:`traced_peak` counts what NumPy (and array_api_strict) allocate, exactly. Frameworks that
do not report to tracemalloc are measured by resident memory (Linux, glibc), sampled from
``/proc/self/statm`` while the call runs. Two things keep the reading honest: freed heap memory is handed back to the system first (``malloc_trim``), so
what the call allocates shows up as new resident pages instead of reused ones; and for
measurements where allocation speed does not matter, :func:`unmap_large_blocks` makes glibc
return every large block on free, so RSS follows the live arrays through the whole run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import threading
import time
import tracemalloc
from typing import Any, Callable

from reformer_core._tree import tree_leaves

__all__ = ["traced_peak", "tree_nbytes", "resident_bytes", "rss_peak", "unmap_large_blocks"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tree_nbytes(tree: Any) -> int:
    """Bytes held by the arrays of a pytree."""
    return sum(int(leaf.nbytes) for leaf in tree_leaves(tree))


def traced_peak(fn: Callable[[], Any]):
    """Run ``fn`` under tracemalloc; returns ``(result, peak bytes allocated during the call)``."""
    gc.collect()
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return result, max(0, peak - base)


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def resident_bytes() -> int | None:
    """This process's resident memory, or None where ``/proc`` is missing."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _trim() -> None:
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def unmap_large_blocks() -> bool:
    """Tell glibc to serve blocks of 128 KiB and up by ``mmap`` and unmap them on free (no
    adaptive threshold). Makes every large allocation fault in fresh pages, so use it for
    memory runs, not timing runs. Returns whether it took effect."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 17)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 17))


def rss_peak(fn: Callable[[], Any], synchronize: Callable[..., None]) -> int | None:
    """Resident memory growth during one call (its result waited for), sampled every 0.2 ms."""
    gc.collect()
    _trim()
    base = resident_bytes()
    if base is None:
        return None
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            value = resident_bytes()
            if value is not None and value > peak[0]:
                peak[0] = value
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        synchronize(fn())
    finally:
        done.set()
        sampler.join()
    return max(0, peak[0] - base)
