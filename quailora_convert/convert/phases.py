"""Where a conversion's time goes: exclusive wall seconds per phase, nested phases subtracted from their parent."""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

PHASES = ("read", "forward", "hessian", "quantize", "solve", "write")
# read: checkpoint tensors into the layer; forward: full-precision layer calls (hooks excluded);
# hessian: the H updates in the hooks; quantize: rounding (GPTQ), refinement bookkeeping and objectives;
# solve: the adapter solves and (--report-baseline) the report's weight-space baseline;
# write: bundle shards and the resume state.


class PhaseTimer:
    """Accumulates exclusive seconds per phase; on CUDA it synchronises at every boundary so queued
    kernels are charged to the phase that launched them."""

    def __init__(self, device: torch.device, seconds: dict[str, float] | None = None):
        self.seconds = {name: 0.0 for name in PHASES} | dict(seconds or {})
        self._synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self._stack: list[list[float]] = []  # per open phase: [started, seconds of its nested phases]

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in self.seconds:
            raise ValueError(f"unknown phase {name!r}; phases are {', '.join(PHASES)}")
        self._synchronize()
        self._stack.append([time.perf_counter(), 0.0])
        try:
            yield
        finally:
            self._synchronize()
            started, nested = self._stack.pop()
            elapsed = time.perf_counter() - started
            self.seconds[name] += elapsed - nested
            if self._stack:
                self._stack[-1][1] += elapsed
