"""Every file name of a bundle, the shard index format, and the rule that reads a checkpoint's dtype.

A bundle is a Hugging Face checkpoint folder, so the checkpoint names here (config.json,
model.safetensors, its index) are also the ones a source folder is read by. Importing this module
costs nothing (no torch): the CLI reads it before any command runs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CONFIG = "config.json"
SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The QuAILoRA adapter's folder inside a bundle, as LoftQ (loftq_init/) and PiSSA (pissa_init/) lay theirs out:
# the quantized base at the root, loaded by plain transformers alone; the adapter with
# PeftModel.from_pretrained(base, BUNDLE, subfolder=INIT_ADAPTER_DIR, is_trainable=True).
INIT_ADAPTER_DIR = "quailora_init"
INIT_ADAPTER_CONFIG = f"{INIT_ADAPTER_DIR}/{ADAPTER_CONFIG}"  # relative to the bundle root (a Hub path too)
INIT_ADAPTER_WEIGHTS = f"{INIT_ADAPTER_DIR}/{ADAPTER_WEIGHTS}"
REPORT = "quailora_report.json"
EVAL = "quailora_eval.json"  # written by `eval`: {"rows": [{"model", "perplexity"}], "gap_closed", "data"}
CARD = "README.md"  # the Hub model card
# Copied from the source folder as they are (glob patterns): tokenizer, chat template, generation defaults.
COPIED_FROM_SOURCE = [
    "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt",
    "*.model", "*.tiktoken", "chat_template*",
]
DEFAULT_MAX_SHARD_BYTES = 1 << 30  # a base shard is closed once it holds this much


def shard_name(number: int, count: int) -> str:
    """The k-th of n base shards (1-based), as transformers names them."""
    return f"model-{number:05d}-of-{count:05d}.safetensors"


def open_shard_name(number: int) -> str:
    """A base shard while the total count is not known yet; renamed with shard_name() at the end."""
    return f"model-{number:05d}.safetensors"


def index_json(weight_map: dict[str, str], total_size: int) -> dict:
    """A shard index (model.safetensors.index.json, or its pickle twin): tensor name -> shard file."""
    return {"metadata": {"total_size": total_size}, "weight_map": weight_map}


def read_weight_map(index: Path) -> dict[str, str]:
    """tensor name -> shard file, from a shard index."""
    return dict(json.loads(Path(index).read_text())["weight_map"])


def index_shards(index: Path) -> list[str]:
    """The shard files a shard index lists, sorted, once each."""
    return sorted(set(read_weight_map(index).values()))


def read_config(folder: Path) -> dict:
    """config.json of a checkpoint folder, as a dict; BadInputError naming the file when it is not a JSON object."""
    from ..errors import BadInputError

    path = Path(folder) / CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise BadInputError(f"{CONFIG} at {path} is not UTF-8 text (byte {e.start}): the file is corrupt; "
                            "re-download or re-export the model") from e
    except json.JSONDecodeError as e:
        raise BadInputError(f"{CONFIG} at {path} is not valid JSON (line {e.lineno} col {e.colno}): {e.msg}; "
                            "fix or re-download it") from e
    if not isinstance(config, dict):
        raise BadInputError(f"{CONFIG} at {path} is not a JSON object; fix or re-download it")
    return config


def config_dtype(config: dict) -> torch.dtype | None:
    """The dtype config.json declares (`dtype`, or the older `torch_dtype`), None when it names none."""
    import torch

    name = config.get("dtype") or config.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    return None


POSITION_LIMIT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def position_limit(config) -> tuple[int, str] | None:
    """(positions, the config key saying so) for the model of config; None when its config names no limit."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    stored = vars(text)  # the keys config.json spells (attribute_map aliases resolve to them)
    for key in POSITION_LIMIT_KEYS:
        value = stored.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, key
    return None
