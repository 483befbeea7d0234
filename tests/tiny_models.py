"""Tiny random models built from configs, saved as sharded safetensors folders with a tokenizer."""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

VOCAB = 512


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a fixed toy vocabulary: no download, deterministic."""
    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3}
    for i in range(VOCAB - len(vocab)):
        vocab[chr(ord("a") + i % 26) * (1 + i // 26)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def save_tiny(config, folder: Path, dtype=torch.bfloat16, seed: int = 0, shard_size: str = "300KB") -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(folder, max_shard_size=shard_size)
    byte_tokenizer().save_pretrained(folder)
    return folder


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, vocab_size=VOCAB, pad_token_id=1, bos_token_id=2,
                  eos_token_id=3, tie_word_embeddings=False)
    values.update(overrides)
    return LlamaConfig(**values)


def write_text_calibration(path: Path, count: int = 24, seed: int = 0) -> Path:
    """Plain-text .jsonl of random toy words: calibration that needs no external data."""
    import json
    import random

    rng = random.Random(seed)
    words = [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(VOCAB - 4)]
    lines = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(8, 40)))}) for _ in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return path


def save_tiny_half_config(folder: Path, stored: torch.dtype, edit) -> Path:
    """A tiny Llama stored in `stored` whose config.json says float16, with edit(weights) applied to its tensors
    (a float16 config over values float16 may not hold: issue 22's bundle that cannot work)."""
    import json

    from safetensors.torch import load_file, save_file

    save_tiny(tiny_llama_config(), folder, dtype=stored, shard_size="10MB")
    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config.pop("torch_dtype", None)
    config["dtype"] = "float16"
    (folder / "config.json").write_text(json.dumps(config))
    return folder
