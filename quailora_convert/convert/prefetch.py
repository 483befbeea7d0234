"""Reading the next decoder layer's weights from the shards on a background thread while the current layer
runs its forward and solves: at 70B a layer is ~1.7 GB of bfloat16, seconds of disk per layer that would
otherwise stall the device. On accelerators only (reads_ahead): on the CPU the thread slows the work it waits on.

The thread has its own CheckpointReader (file handles are not shared between threads) and releases its
memory maps after each layer, as the pipeline does with its own. What it reads is checked exactly as a
synchronous read is (CheckpointReader.get: unreadable or non-finite tensors are errors), and an error
surfaces where the layer is taken, in the main thread. On CUDA the tensors land in pinned host memory
(host_memory: within its budget), so their copy to the device can run asynchronously.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from ..sources.checkpoint import CheckpointReader, KeyMap, read_parameter
from .host_memory import pinned_copy


def reads_ahead(device: torch.device) -> bool:
    """Whether a conversion on device reads each layer ahead: on accelerators, where the host's cores are free
    while the device computes. Not on the CPU, where the reading thread's work (its torch ops: the finite check,
    copies) runs on the cores the forward and the solves use, and slows them more than the reads cost: SmolLM2,
    32 samples, 2 cores (`python benchmarks/read_ahead.py`, 2 alternating rounds): 51.6 / 52.1 s with it against
    45.6 / 43.4 s without (forward 21.2 against 18.1 s, solve 17.4 against 14.7 s), while reading every layer
    when it starts took 0.2 s in all."""
    return device.type != "cpu"


class LayerPrefetch:
    """At most one layer read ahead: schedule(prefix, layer) starts reading its parameters, take(prefix)
    waits for them ({name relative to the layer: tensor as stored}), or returns None when that layer was
    not scheduled (the first layer, the first after a resume), which the caller then reads itself."""

    def __init__(self, folder: Path, key_map: KeyMap, pin: bool):
        self._reader = CheckpointReader(folder)
        self._key_map = key_map
        self._pin = pin
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quailora-prefetch")
        self._pending: tuple[str, Future] | None = None

    def schedule(self, prefix: str, layer: nn.Module) -> None:
        names = [name for name, _ in layer.named_parameters()]  # the meta skeleton's, read here in the main thread
        self._drop_pending()
        self._pending = (prefix, self._pool.submit(self._read, prefix, names))

    def take(self, prefix: str) -> dict[str, torch.Tensor] | None:
        if self._pending is None or self._pending[0] != prefix:
            return None
        future = self._pending[1]
        self._pending = None
        return future.result()

    def close(self) -> None:
        """Waits for a read in flight (at most one layer's) and ends the thread."""
        self._drop_pending()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._reader.release()

    def __enter__(self) -> LayerPrefetch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read(self, prefix: str, names: list[str]) -> dict[str, torch.Tensor]:
        try:
            tensors = {name: read_parameter(self._reader, self._key_map, prefix, name) for name in names}
            return {name: pinned_copy(t) for name, t in tensors.items()} if self._pin else tensors
        finally:
            self._reader.release()  # as the pipeline does after each layer: the maps' resident pages go

    def _drop_pending(self) -> None:
        if self._pending is not None:
            self._pending[1].cancel()
            self._pending = None
