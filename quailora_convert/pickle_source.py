"""Pickle-only checkpoints (pytorch_model*.bin), converted shard by shard to safetensors on request.

Unpickling can run code, so it happens only with --allow-pickle, and then with torch's
weights_only loader. One .bin shard is in memory at a time; the safetensors copy lives in a
temporary folder removed when the process exits, and the streaming pipeline reads it as usual.
"""
from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import UnsupportedModelError
from .safetensors_stream import SafetensorsStreamWriter

BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
SAFETENSORS_NAMES = ("model.safetensors", "model.safetensors.index.json")


def pickle_shards(folder: Path) -> list[str]:
    """The .bin shards of a folder that has no safetensors weights ([] when it has them or none)."""
    folder = Path(folder)
    if any((folder / name).exists() for name in SAFETENSORS_NAMES):
        return []
    index = folder / BIN_INDEX
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [BIN_SINGLE] if (folder / BIN_SINGLE).exists() else []


def require_safetensors(folder: Path, allow_pickle: bool) -> Path:
    """folder itself when it holds safetensors; its converted copy for pickle weights and allow_pickle."""
    shards = pickle_shards(folder)
    if not shards:
        return Path(folder)
    if not allow_pickle:
        raise UnsupportedModelError(
            f"{folder} holds only pickle weights ({shards[0]}...); unpickling can run code: pass --allow-pickle "
            "if you trust this checkpoint, or convert it to safetensors first")
    out = Path(tempfile.mkdtemp(prefix="quailora-pickle-"))
    atexit.register(shutil.rmtree, out, True)
    return to_safetensors(Path(folder), shards, out)


def to_safetensors(folder: Path, shards: list[str], out: Path) -> Path:
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        writer = SafetensorsStreamWriter(out / name)
        state = torch.load(folder / shard, map_location="cpu", weights_only=True)  # one shard in memory
        for key, tensor in state.items():
            writer.add(key, tensor)
            weight_map[key] = name
        writer.close()
        total += writer.nbytes
        del state
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    for path in folder.iterdir():  # config, tokenizer, generation config, custom code
        if path.is_file() and not path.name.endswith(".bin") and path.name != BIN_INDEX:
            shutil.copyfile(path, out / path.name)
    return out
