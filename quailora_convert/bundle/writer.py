"""Writing a QLoRA bundle as the conversion goes: quantized base shards, adapter, configs, report.

Everything is written into a hidden temporary folder beside the destination and renamed into
place by finish(): an interrupted run never leaves something that looks like a bundle. Used as
a context manager, the writer removes its temporary folder when the block raises.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path

import torch

from ..errors import BadInputError
from . import layout
from .safetensors_stream import SafetensorsStreamWriter


class BundleWriter:
    def __init__(self, out: Path, overwrite: bool = False, max_shard_bytes: int = layout.DEFAULT_MAX_SHARD_BYTES):
        self.out = Path(out).resolve()
        if self.out.exists() and not overwrite and (not self.out.is_dir() or any(self.out.iterdir())):
            raise BadInputError(f"--out {out} already exists; choose another folder or pass --overwrite")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.with_name(f".{self.out.name}.partial-{os.getpid()}")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        self.max_shard_bytes = max_shard_bytes
        self._shards: list[SafetensorsStreamWriter] = []
        self._adapter = SafetensorsStreamWriter(self.tmp / layout.ADAPTER_WEIGHTS)

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if error is not None:
            self.abort()
        return False

    # -- base model -------------------------------------------------------------------------
    def add_base_tensor(self, name: str, tensor: torch.Tensor) -> None:
        if not self._shards or self._shards[-1].nbytes >= self.max_shard_bytes:
            if self._shards:
                self._shards[-1].close()
            self._shards.append(SafetensorsStreamWriter(self.tmp / layout.open_shard_name(len(self._shards) + 1)))
        self._shards[-1].add(name, tensor)

    def add_adapter_tensor(self, name: str, tensor: torch.Tensor) -> None:
        self._adapter.add(name, tensor)

    def write_json(self, name: str, data: dict) -> None:
        (self.tmp / name).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")

    def copy_files(self, folder: Path, patterns: list[str]) -> list[str]:
        copied = []
        for path in sorted(Path(folder).iterdir()):
            if path.is_file() and any(fnmatch.fnmatch(path.name, p) for p in patterns):
                shutil.copyfile(path, self.tmp / path.name)
                copied.append(path.name)
        return copied

    # -- finishing --------------------------------------------------------------------------
    def _close_shards(self) -> None:
        self._adapter.close()
        if not self._shards:
            raise RuntimeError("no base tensor was written")
        self._shards[-1].close()
        if len(self._shards) == 1:
            self._shards[0].path.rename(self.tmp / layout.SAFETENSORS_SINGLE)
            return
        weight_map, total = {}, 0
        for k, shard in enumerate(self._shards, 1):
            final = shard.path.with_name(layout.shard_name(k, len(self._shards)))
            shard.path.rename(final)
            weight_map.update({name: final.name for name in shard.names()})
            total += shard.nbytes
        self.write_json(layout.SAFETENSORS_INDEX, layout.index_json(weight_map, total))

    def finish(self) -> Path:
        self._close_shards()
        if self.out.exists():
            trash = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            self.out.rename(trash)
            self.tmp.rename(self.out)
            shutil.rmtree(trash)
        else:
            self.tmp.rename(self.out)
        return self.out

    def abort(self) -> None:
        for stream in (self._adapter, *self._shards):
            stream.discard()
        shutil.rmtree(self.tmp, ignore_errors=True)
