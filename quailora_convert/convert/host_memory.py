"""Pinned (page-locked) host memory for copies to and from a CUDA device, within a budget.

Copies between a CUDA device and pinned host memory run asynchronously; from ordinary (pageable) memory
they do not. But PyTorch's caching host allocator rounds every pinned block up to a power of two (a
batch of SmolLM2 hidden states, 576 wide, takes 1.78x its bytes) and keeps freed blocks page-locked for
reuse until its cache is emptied. So pinned() pins only while the rounded bytes of the pinned tensors
alive stay within PINNED_FRACTION of the host's memory, falls back to pageable memory beyond that or
when pinning fails, and pinned_scope() empties the allocator's cache when the conversion ends.
"""
from __future__ import annotations

import os
import threading
import weakref
from contextlib import contextmanager
from typing import Iterator

import torch

PINNED_FRACTION = 0.25  # of the host's physical memory, at most, page-locked by this process's pinned tensors

_lock = threading.Lock()  # the read-ahead thread pins too
_state = {"live": 0, "failed": False}


def pinned_budget() -> int:
    return int(PINNED_FRACTION * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def rounded(nbytes: int) -> int:
    """The bytes the caching host allocator takes for a block of nbytes: the next power of two."""
    return 1 << max(nbytes - 1, 0).bit_length()


def pinned(shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty host tensor, pinned while the budget allows (torch.Tensor.is_pinned() tells), else pageable."""
    cost = rounded(torch.Size(shape).numel() * dtype.itemsize)
    with _lock:
        allowed = not _state["failed"] and _state["live"] + cost <= pinned_budget()
        if allowed:
            _state["live"] += cost
    if not allowed:
        return torch.empty(shape, dtype=dtype)
    try:
        tensor = torch.empty(shape, dtype=dtype, pin_memory=True)
    except RuntimeError:  # the driver refused to page-lock more: pageable from now on
        with _lock:
            _state["live"] -= cost
            _state["failed"] = True
        return torch.empty(shape, dtype=dtype)
    weakref.finalize(tensor, _release, cost)
    return tensor


def pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """tensor (on the host) copied into pinned(); its own storage where the budget is spent."""
    host = pinned(tensor.shape, tensor.dtype)
    return host.copy_(tensor) if host.is_pinned() else tensor


def pinned_bytes() -> int:
    """Rounded bytes of the pinned tensors alive now."""
    with _lock:
        return _state["live"]


@contextmanager
def pinned_scope(device: torch.device) -> Iterator[None]:
    """Around a conversion on device: on CUDA, the allocator's cached pinned blocks are freed at the end."""
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.accelerator.empty_host_cache()
        with _lock:
            _state["failed"] = False


def _release(cost: int) -> None:
    with _lock:
        _state["live"] -= cost
