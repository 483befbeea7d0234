"""Writing safetensors files one tensor at a time, straight into place, resumable after a crash.

A safetensors file is an 8-byte header length, a JSON header, then the tensor bytes. The header is
known only at the end, so the writer reserves a fixed header region up front and appends each
tensor's bytes behind it; close() writes the header into the region, padded with spaces (the format
allows trailing whitespace). The data is never copied: a file of S bytes needs S bytes of disk, and
peak memory is one tensor. state() and resume() let a crashed run continue a half-written file.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from ..errors import BadInputError

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_LENGTH_BYTES = 8
# Upper bound on one header entry beyond its quoted name, with up to four 10-digit dims and two
# 20-digit offsets: ,"NAME":{"dtype":"BF16","shape":[D,D,D,D],"data_offsets":[O,O]}
ENTRY_OVERHEAD = 136


def _compact(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def header_bytes_for(names: list[str], metadata: dict[str, str] | None = None) -> int:
    """A header region that holds entries for these names (tensors of up to 4 dims), 8-byte aligned."""
    size = len(_compact({"__metadata__": {"format": "pt", **(metadata or {})}}))
    size += sum(len(_compact(name)) + ENTRY_OVERHEAD for name in names)
    return size + (-size % 8)


NO_SPACE = {errno.ENOSPC: "no space left", errno.EDQUOT: "over the disk quota"}


@contextmanager
def disk_full_named(folder: Path, name: str | None = None, nbytes: int | None = None) -> Iterator[None]:
    """A write into folder (of file name) that runs out of disk (ENOSPC) or quota (EDQUOT) as one BadInputError
    naming the folder, with the bytes the write needed (nbytes, when known) and those free; other OSErrors as
    they are."""
    try:
        yield
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        try:
            free = f"{shutil.disk_usage(folder).free:,} bytes free"
        except OSError:
            free = "free space unknown"
        writing = f" while writing {name}" if name else ""
        needed = f"{nbytes:,} bytes to write, " if nbytes else ""
        raise BadInputError(f"{NO_SPACE[e.errno]} on the disk of {folder}{writing} ({needed}{free}): free some space "
                            "or choose an --out on another disk") from e


class SafetensorsStreamWriter:
    """One safetensors file written tensor by tensor behind a header region of header_bytes."""

    def __init__(self, path: Path, header_bytes: int, metadata: dict[str, str] | None = None,
                 *, _state: dict | None = None):
        if header_bytes % 8:
            raise ValueError(f"header_bytes must be a multiple of 8 (data stays aligned), got {header_bytes}")
        self.path = Path(path)
        self.header_bytes = header_bytes
        self._metadata = {"format": "pt", **(metadata or {})}
        self._header: dict[str, dict] = dict(_state["header"]) if _state else {}
        self.nbytes = _state["nbytes"] if _state else 0
        self._header_size = len(_compact(self._header_json()))
        with disk_full_named(self.path.parent, self.path.name):
            self._file = open(self.path, "r+b" if _state else "wb")
            self._file.truncate(self._data_start + self.nbytes)  # a crashed run may have appended more
            self._file.seek(self._data_start + self.nbytes)

    @classmethod
    def resume(cls, path: Path, state: dict) -> SafetensorsStreamWriter:
        """Continue a file from state() taken earlier: anything written after it is cut off."""
        return cls(path, state["header_bytes"], state["metadata"], _state=state)

    @property
    def _data_start(self) -> int:
        return _LENGTH_BYTES + self.header_bytes

    def _header_json(self) -> dict:
        return {"__metadata__": self._metadata, **self._header}

    def _entry(self, tensor: torch.Tensor, nbytes: int) -> dict:
        return {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                "data_offsets": [self.nbytes, self.nbytes + nbytes]}

    def fits(self, name: str, tensor: torch.Tensor) -> bool:
        """Whether the header region has room for one more entry."""
        nbytes = tensor.numel() * tensor.element_size()
        entry = 1 + len(_compact(name)) + 1 + len(_compact(self._entry(tensor, nbytes)))
        return self._header_size + entry <= self.header_bytes

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._header:
            raise ValueError(f"tensor {name} written twice")
        if not self.fits(name, tensor):
            raise ValueError(f"{self.path.name}: the reserved header of {self.header_bytes} bytes is full at {name}")
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        entry = self._entry(tensor, nbytes)
        self._header_size += 1 + len(_compact(name)) + 1 + len(_compact(entry))
        self._header[name] = entry
        if nbytes:  # straight from the tensor's memory, no copy
            with disk_full_named(self.path.parent, self.path.name, nbytes):
                self._file.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        self.nbytes += nbytes

    def names(self) -> list[str]:
        return list(self._header)

    def sync(self) -> None:
        """Everything added so far on disk (before state() is recorded as a resume point)."""
        with disk_full_named(self.path.parent, self.path.name):
            self._file.flush()
            os.fsync(self._file.fileno())

    def state(self) -> dict:
        """JSON-able: what resume() needs to continue this file."""
        return {"header_bytes": self.header_bytes, "metadata": self._metadata, "header": dict(self._header),
                "nbytes": self.nbytes}

    def discard(self) -> None:
        """Stop writing, leaving the file as it is (a resume cuts it back to its last state)."""
        self._file.close()

    def close(self) -> None:
        header = _compact(self._header_json()).encode()
        if len(header) > self.header_bytes:
            raise AssertionError(f"{self.path.name}: header {len(header)} bytes > reserved {self.header_bytes}")
        self._file.seek(0)
        with disk_full_named(self.path.parent, self.path.name):
            self._file.write(self.header_bytes.to_bytes(_LENGTH_BYTES, "little"))
            self._file.write(header + b" " * (self.header_bytes - len(header)))
        self.sync()  # a resume point may record this file as finished
        self._file.close()
