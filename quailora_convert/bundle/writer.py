"""Writing a QLoRA bundle as the conversion goes: quantized base shards, adapter, configs, report.

The writer fills one folder (the work folder's bundle/, see convert.work_folder) that becomes the
bundle when it is renamed into place. Shard data goes straight into the final files behind a
reserved header (safetensors_stream), so a shard of S bytes needs S bytes of disk. sync() and
state() mark a resume point; BundleWriter(folder, ..., state=...) continues from one, cutting off
whatever a crashed run wrote after it.
"""
from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import torch

from . import layout
from .safetensors_stream import SafetensorsStreamWriter

# Header region of a base shard: ~130 bytes an entry, so ~2000 tensors (a 70B model's 5 GB shard
# holds ~500). A shard also closes early when its header is full.
BASE_HEADER_BYTES = 256 << 10


class BundleWriter:
    def __init__(self, folder: Path, max_shard_bytes: int, adapter_header_bytes: int, state: dict | None = None):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self._closed: list[dict] = []  # state() of every finished base shard
        self._shard: SafetensorsStreamWriter | None = None
        if state is None:
            (self.folder / layout.INIT_ADAPTER_DIR).mkdir(parents=True, exist_ok=True)
            self._adapter = SafetensorsStreamWriter(self.folder / layout.INIT_ADAPTER_WEIGHTS, adapter_header_bytes)
            return
        self._closed = list(state["closed_shards"])
        count = len(self._closed) + (state["open_shard"] is not None)
        self._restore_open_names(count)
        self._adapter = SafetensorsStreamWriter.resume(self.folder / layout.INIT_ADAPTER_WEIGHTS, state["adapter"])
        if state["open_shard"] is not None:
            self._shard = SafetensorsStreamWriter.resume(self._shard_path(len(self._closed) + 1), state["open_shard"])
        known = {layout.INIT_ADAPTER_WEIGHTS, *(layout.open_shard_name(k) for k in range(1, count + 1))}
        for path in sorted(self.folder.rglob("*")):  # written after the resume point: a shard begun, a config
            if path.is_file() and path.relative_to(self.folder).as_posix() not in known:
                path.unlink()

    # -- base model -------------------------------------------------------------------------
    def add_base_tensor(self, name: str, tensor: torch.Tensor) -> None:
        shard = self._shard
        if shard is None or shard.nbytes >= self.max_shard_bytes or not shard.fits(name, tensor):
            if shard is not None:
                shard.close()
                self._closed.append(shard.state())
            self._shard = SafetensorsStreamWriter(self._shard_path(len(self._closed) + 1), BASE_HEADER_BYTES)
        self._shard.add(name, tensor)

    def add_adapter_tensor(self, name: str, tensor: torch.Tensor) -> None:
        self._adapter.add(name, tensor)

    def write_json(self, name: str, data: dict) -> None:
        """name: a path relative to the bundle root (layout.INIT_ADAPTER_CONFIG is inside the adapter's folder)."""
        (self.folder / name).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")

    def copy_files(self, folder: Path, patterns: list[str]) -> list[str]:
        copied = []
        for path in sorted(Path(folder).iterdir()):
            if path.is_file() and any(fnmatch.fnmatch(path.name, p) for p in patterns):
                shutil.copyfile(path, self.folder / path.name)
                copied.append(path.name)
        return copied

    # -- resume points -----------------------------------------------------------------------
    def sync(self) -> None:
        """Every tensor added so far is on disk."""
        for stream in (self._adapter, self._shard):
            if stream is not None:
                stream.sync()

    def state(self) -> dict:
        """JSON-able: what BundleWriter(..., state=) needs to continue from here (after sync())."""
        return {"closed_shards": list(self._closed), "adapter": self._adapter.state(),
                "open_shard": self._shard.state() if self._shard is not None else None}

    # -- finishing ---------------------------------------------------------------------------
    def _restore_open_names(self, count: int) -> None:
        """A run that crashed inside close() may have given some shards their final names."""
        for k in range(1, count + 1):
            finals = [layout.shard_name(k, count)] + ([layout.SAFETENSORS_SINGLE] if count == 1 else [])
            for final in finals:
                if not self._shard_path(k).exists() and (self.folder / final).exists():
                    (self.folder / final).rename(self._shard_path(k))

    def _shard_path(self, number: int) -> Path:
        return self.folder / layout.open_shard_name(number)

    def close(self) -> None:
        """Headers written, shards named as transformers names them (with an index if several)."""
        self._adapter.close()
        if self._shard is None:
            raise RuntimeError("no base tensor was written")
        self._shard.close()
        shards = [*self._closed, self._shard.state()]
        self._shard = None
        if len(shards) == 1:
            self._shard_path(1).rename(self.folder / layout.SAFETENSORS_SINGLE)
            return
        weight_map, total = {}, 0
        for k, shard in enumerate(shards, 1):
            final = layout.shard_name(k, len(shards))
            self._shard_path(k).rename(self.folder / final)
            weight_map.update({name: final for name in shard["header"]})
            total += shard["nbytes"]
        self.write_json(layout.SAFETENSORS_INDEX, layout.index_json(weight_map, total))

    def discard(self) -> None:
        """Stop writing; the files stay as they are (the work folder decides what happens to them)."""
        for stream in (self._adapter, self._shard):
            if stream is not None:
                stream.discard()
