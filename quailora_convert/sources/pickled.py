"""Pickle-only checkpoints (pytorch_model*.bin), converted shard by shard to safetensors on request.

Unpickling can run code, so it happens only with --allow-pickle, and then with torch's
weights_only loader. One .bin shard is in memory at a time; the safetensors copy lives in a
temporary folder removed when its block ends, and the streaming pipeline reads it as usual.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from ..bundle.layout import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, index_json, index_shards, shard_name
from ..bundle.safetensors_stream import SafetensorsStreamWriter, header_bytes_for
from ..errors import UnsupportedModelError

PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"


def pickle_shards(folder: Path) -> list[str]:
    """The .bin shards of a folder that has no safetensors weights ([] when it has them or none)."""
    folder = Path(folder)
    if any((folder / name).exists() for name in (SAFETENSORS_SINGLE, SAFETENSORS_INDEX)):
        return []
    index = folder / PICKLE_INDEX
    if index.exists():
        return index_shards(index)
    return [PICKLE_SINGLE] if (folder / PICKLE_SINGLE).exists() else []


@contextmanager
def safetensors_weights(folder: Path, allow_pickle: bool) -> Iterator[Path]:
    """folder itself when it holds safetensors; for pickle weights and allow_pickle, a temporary converted copy."""
    shards = pickle_shards(folder)
    if not shards:
        yield Path(folder)
        return
    if not allow_pickle:
        raise UnsupportedModelError(
            f"{folder} holds only pickle weights ({shards[0]}...); unpickling can run code: pass --allow-pickle "
            "if you trust this checkpoint, or convert it to safetensors first")
    with tempfile.TemporaryDirectory(prefix="quailora-pickle-") as out:
        yield to_safetensors(Path(folder), shards, Path(out))


def to_safetensors(folder: Path, shards: list[str], out: Path) -> Path:
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        name = shard_name(k, len(shards))
        state = torch.load(folder / shard, map_location="cpu", weights_only=True)  # one shard in memory
        writer = SafetensorsStreamWriter(out / name, header_bytes_for(list(state)))
        for key, tensor in state.items():
            writer.add(key, tensor)
            weight_map[key] = name
        writer.close()
        total += writer.nbytes
        del state
    (out / SAFETENSORS_INDEX).write_text(json.dumps(index_json(weight_map, total), indent=2))
    for path in folder.iterdir():  # config, tokenizer, generation config, custom code
        if path.is_file() and not path.name.endswith(".bin") and path.name != PICKLE_INDEX:
            shutil.copyfile(path, out / path.name)
    return out
