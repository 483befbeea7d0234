"""Keeping the host heap from growing with the number of layers: a process-wide allocator setting.

The library never applies it itself (it changes the whole process's malloc); the CLI opts in before
a conversion, and so can any other program that runs long conversions.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 64 << 10


def serve_large_blocks_from_mmap() -> bool:
    """Make glibc serve every block over 64 KiB with mmap, so freed tensors go back to the OS.

    By default glibc raises its mmap threshold after large blocks are freed; later per-layer
    tensors then come from the heap, fragment it, and RSS grew ~14 MiB per layer at hidden 512
    (benchmarks/memory.py: peak ratio 24/6 layers 1.48, and 1.00 with this setting). A no-op
    off glibc. Returns whether the setting was applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
    if not applied:
        log.debug("mallopt(M_MMAP_THRESHOLD) was refused; host memory may grow with the layer count")
    return applied
