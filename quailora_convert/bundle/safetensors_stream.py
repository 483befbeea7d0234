"""Writing safetensors files one tensor at a time, without holding the whole file in memory.

Tensor bytes are appended to a side file as they come; close() writes the header and copies
the bytes behind it. Peak memory is one tensor, whatever the file's size.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


class SafetensorsStreamWriter:
    def __init__(self, path: Path, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._data_path = self.path.with_name(self.path.name + ".data")
        self._data = open(self._data_path, "wb")
        self._header: dict[str, dict] = {}
        self._metadata = {"format": "pt", **(metadata or {})}
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._header:
            raise ValueError(f"tensor {name} written twice")
        tensor = tensor.detach().to("cpu").contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        self._header[name] = {
            "dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
            "data_offsets": [self.nbytes, self.nbytes + len(raw)],
        }
        self._data.write(raw)
        self.nbytes += len(raw)

    def discard(self) -> None:
        """Stop writing: close the side file (its folder is being removed)."""
        self._data.close()

    def names(self) -> list[str]:
        return list(self._header)

    def close(self) -> None:
        self._data.close()
        header = json.dumps({"__metadata__": self._metadata, **self._header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # keep the data 8-byte aligned
        with open(self.path, "wb") as out, open(self._data_path, "rb") as data:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(data, out, length=16 << 20)
        self._data_path.unlink()
