"""Keeping the host heap from growing with the number of layers: a process-wide allocator setting.

The library never applies it itself (it changes the whole process's malloc); the CLI opts in before
a conversion, and so can any other program that runs long conversions.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 64 << 10
# During a forward pass: temporaries up to glibc's largest mmap threshold come from the heap, which keeps them.
FORWARD_MMAP_THRESHOLD_BYTES = 32 << 20
FORWARD_TRIM_THRESHOLD_BYTES = 1 << 30
DEFAULT_TRIM_THRESHOLD_BYTES = 128 << 10  # glibc's own

_applied = {"libc": None}  # the libc whose mallopt serve_large_blocks_from_mmap() called


def serve_large_blocks_from_mmap() -> bool:
    """Make glibc serve every block over 64 KiB with mmap, so freed tensors go back to the OS.

    By default glibc raises its mmap threshold after large blocks are freed; later per-layer
    tensors then come from the main arena's heap, fragment it, and RSS grows with every layer.
    benchmarks/memory.py, hidden 1024, 16 samples x 128 tokens, rank 16, peak RSS 6 -> 24 layers:

    - without this setting, torch's default 2 threads: 1090.6 -> 1662.2 MiB (ratio 1.52); the main
      arena held 1106 MiB, 939 MiB of it free. With OMP_NUM_THREADS=1 it grows alike (6 layers
      1124.7 MiB, 24 layers past 1327 MiB by layer 13): the threads are not the cause.
    - with it: 881.9 -> 883.2 MiB (1.002) with 2 threads, the CLI 891.1 -> 894.0 MiB (1.003), and
      874.2 -> 876.0 MiB (1.002) with OMP_NUM_THREADS=1.

    The threshold is process-wide (mallopt sets it for every arena, the per-thread ones included):
    with it the worker threads' arenas stay under 1 MiB (33 MiB without), and the main arena at
    ~148 MiB for any layer count. A no-op off glibc (musl, macOS, Windows). Returns whether the
    setting was applied.
    """
    if not _is_glibc():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    if not applied:
        log.debug("mallopt(M_MMAP_THRESHOLD) was refused; host memory may grow with the layer count")
    _applied["libc"] = libc if applied else None
    return applied


@contextmanager
def heap_for_forward() -> Iterator[None]:
    """While a forward pass runs, blocks up to 32 MiB come from the heap, which keeps freed pages for the
    next batch (trim threshold 1 GiB); after it the heap's free pages go back to the OS (malloc_trim) and
    the 64 KiB mmap threshold is back, so the per-layer weights and solves never fragment the heap. A no-op
    unless serve_large_blocks_from_mmap() applied its setting.

    Why: every mmap-served block is a fresh mapping whose pages the kernel faults in and zeroes, on every
    allocation, and a forward pass allocates and frees the same large temporaries for every batch: with the
    64 KiB threshold alone the conversion's forward cost 1.5x a bare forward (benchmarks/speed.py) and
    `python benchmarks/forward_allocator.py` (SmolLM2, 32 samples <= 512 tokens, medians of 2) measured a
    bare decoder forward at 15.4 s with glibc's defaults, 20.0 s with the 64 KiB threshold and 14.0 s in
    this scope. Keeping the freed pages after the scope instead (no trim) let peak RSS grow with the layer
    count (benchmarks/memory.py, 1 thread: 1068.7 -> 1280.5 MiB from 6 to 24 layers, ratio 1.198).
    """
    libc = _applied["libc"]
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, FORWARD_MMAP_THRESHOLD_BYTES)
    libc.mallopt(M_TRIM_THRESHOLD, FORWARD_TRIM_THRESHOLD_BYTES)
    try:
        yield
    finally:
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD_BYTES)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.malloc_trim(0)


def _is_glibc() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))  # "glibc 2.36"; musl has no such name
    except (ValueError, OSError, AttributeError):
        return False
