"""Every file name of a bundle, and the rule that reads a checkpoint's dtype from its config.

A bundle is a Hugging Face checkpoint folder, so the checkpoint names here (config.json,
model.safetensors, its index) are also the ones a source folder is read by.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIG = "config.json"
SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
REPORT = "quailora_report.json"
EVAL = "quailora_eval.json"  # written by `eval`: {"rows": [{"model", "perplexity"}], "gap_closed", "data"}
CARD = "README.md"  # the Hub model card
# Copied from the source folder as they are (glob patterns): tokenizer, chat template, generation defaults.
COPIED_FROM_SOURCE = [
    "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt",
    "*.model", "*.tiktoken", "chat_template*",
]


def shard_name(number: int, count: int) -> str:
    """The k-th of n base shards (1-based), as transformers names them."""
    return f"model-{number:05d}-of-{count:05d}.safetensors"


def open_shard_name(number: int) -> str:
    """A base shard while the total count is not known yet; renamed with shard_name() at the end."""
    return f"model-{number:05d}.safetensors"


def read_config(folder: Path) -> dict:
    """config.json of a checkpoint folder, as a dict."""
    return json.loads((Path(folder) / CONFIG).read_text())


def config_dtype(config: dict) -> torch.dtype | None:
    """The dtype config.json declares (`dtype`, or the older `torch_dtype`), None when it names none."""
    name = config.get("dtype") or config.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    return None
