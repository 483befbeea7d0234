"""Random-weight checkpoints with the exact shapes, config.json and sharding of real models, for timing and memory.

The tensors' names and shapes come from the model class itself (built on the meta device from the preset's
config: nothing is allocated), in its state_dict order; they are split into shards by huggingface_hub's rule
(in order, a new shard when the next tensor would pass max_shard_size) with the originals' limits (Llama-2: 10GB,
2 shards for 7B; Llama-3: 5GB, 4 shards), and written shard by shard: each tensor is generated in bfloat16,
streamed into its open shard (bundle.safetensors_stream) and freed, so peak memory is about one tensor (the
embedding), never the model. config.json is written last: a folder without it is not a checkpoint.

Weights look like a trained checkpoint's to quantization and to H: normal with std 0.02, a few input columns of
every matrix (embeddings included: outlier hidden channels) scaled by 10-50x, norms near 1. Every tensor has
its own generator seeded by --seed and its name, so a run is reproducible on a device (CPU and CUDA draw
different numbers). The tokenizer is word-level with exactly vocab_size entries (the preset's special tokens
at their real ids), so any id the model knows can be written as text: calibration_text() writes such text.

    python benchmarks/synthetic.py --preset llama-2-7b --out /tmp/llama-2-7b          # 13.5 GB, 2 shards
    python benchmarks/synthetic.py --preset llama-2-70b-slice --layers 4 --out /tmp/70b-4
    python benchmarks/synthetic.py --preset tiny --out /tmp/tiny
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

OUTLIER_EVERY = 512  # one outlier input column per this many (at least one per matrix)
OUTLIER_SCALE = (10.0, 50.0)
WEIGHT_STD = 0.02
NORM_STD = 0.05  # norms: 1 + this x N(0, 1)


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_shard_size: str  # the original's save_pretrained limit
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    specials: dict[str, int] = field(default_factory=lambda: {"<unk>": 0, "<s>": 1, "</s>": 2})
    bos: str = "<s>"
    eos: str = "</s>"


_LLAMA_3_SPECIALS = {"<unk>": 0, "<|begin_of_text|>": 128000, "<|end_of_text|>": 128001}
PRESETS = {
    "llama-2-7b": Preset(4096, 11008, 32, 32, 32, 32000, "10GB"),
    "llama-3-8b": Preset(4096, 14336, 32, 32, 8, 128256, "5GB", rope_theta=500000.0, max_position_embeddings=8192,
                         specials=_LLAMA_3_SPECIALS, bos="<|begin_of_text|>", eos="<|end_of_text|>"),
    "llama-2-70b-slice": Preset(8192, 28672, 80, 64, 8, 32000, "10GB"),  # --layers: its first N layers
    # tests: GQA, intermediate != hidden, dims multiples of 64, several shards
    "tiny": Preset(128, 320, 2, 4, 2, 512, "300KB", max_position_embeddings=512),
}


def llama_config(preset: Preset):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=preset.hidden_size, intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_hidden_layers, num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads, vocab_size=preset.vocab_size,
        max_position_embeddings=preset.max_position_embeddings, rms_norm_eps=preset.rms_norm_eps,
        rope_theta=preset.rope_theta, bos_token_id=preset.specials[preset.bos],
        eos_token_id=preset.specials[preset.eos], tie_word_embeddings=False, dtype="bfloat16")


def tensor_shapes(config) -> dict[str, torch.Size]:
    """name -> shape of every saved tensor, in the model's state_dict order (the model built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: t.shape for name, t in model.state_dict().items()}


def split_into_shards(shapes: dict[str, torch.Size], max_shard_size: str):
    """huggingface_hub's StateDictSplit over bfloat16 sizes (2 bytes per element)."""
    from huggingface_hub import split_state_dict_into_shards_factory

    return split_state_dict_into_shards_factory(
        shapes, get_storage_size=lambda shape: 2 * shape.numel(), filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size)


def generate_tensor(name: str, shape: torch.Size, seed: int, device: torch.device) -> torch.Tensor:
    """One bfloat16 tensor: norms 1 + 0.05 N(0,1); matrices N(0, 0.02^2) with a few input columns x10-50."""
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    t = torch.empty(shape, dtype=torch.bfloat16, device=device)
    if t.dim() == 1:
        return t.normal_(1.0, NORM_STD, generator=g)
    t.normal_(0.0, WEIGHT_STD, generator=g)  # (out, in)
    count = max(1, shape[1] // OUTLIER_EVERY)
    columns = torch.randperm(shape[1], generator=g, device=device)[:count]
    low, high = OUTLIER_SCALE
    scales = torch.empty(count, device=device).uniform_(low, high, generator=g)
    t[:, columns] *= scales.to(torch.bfloat16)
    return t


def word(index: int) -> str:
    """A distinct lowercase word for every index (bijective base 26: a..z, aa, ab, ...)."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return letters


def vocabulary(preset: Preset) -> dict[str, int]:
    """vocab_size entries: the specials at their ids, a distinct word at every other id."""
    taken = set(preset.specials.values())
    vocab = dict(preset.specials)
    words = (word(i) for i in range(preset.vocab_size))
    for token_id in range(preset.vocab_size):
        if token_id not in taken:
            vocab[next(words)] = token_id
    return vocab


def save_tokenizer(preset: Preset, folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocabulary(preset), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token=preset.bos,
                            eos_token=preset.eos).save_pretrained(folder)


def write_checkpoint(preset: Preset, out: Path, seed: int = 0, device: str = "cpu") -> dict:
    """The checkpoint in out (which must not exist or be empty); returns what was written."""
    from quailora_convert.bundle.safetensors_stream import SafetensorsStreamWriter, header_bytes_for
    from quailora_convert.bundle.layout import SAFETENSORS_INDEX, index_json

    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    config = llama_config(preset)
    shapes = tensor_shapes(config)
    split = split_into_shards(shapes, preset.max_shard_size)
    generator_device = torch.device(device)
    for filename, names in split.filename_to_tensors.items():
        writer = SafetensorsStreamWriter(out / filename, header_bytes_for(names))
        for name in names:
            tensor = generate_tensor(name, shapes[name], seed, generator_device)
            writer.add(name, tensor)
            del tensor
        writer.close()
    if split.is_sharded:
        index = index_json(split.tensor_to_filename, split.metadata["total_size"])
        (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    save_tokenizer(preset, out)
    config.save_pretrained(out)  # last: the folder is a checkpoint only once everything else is there
    return {"shards": len(split.filename_to_tensors), "bytes": split.metadata["total_size"], "tensors": len(shapes)}


def calibration_text(preset: Preset, path: Path, words: int, seed: int = 0) -> Path:
    """One plain-text document (.txt: the conversion cuts it into --seq-len windows) of `words` random words of
    the synthetic vocabulary, each one token."""
    rng = random.Random(seed)
    vocab = [w for w in vocabulary(preset) if w not in preset.specials]
    lines = (" ".join(rng.choices(vocab, k=64)) for _ in range(-(-words // 64)))
    path.write_text("\n".join(lines) + "\n")
    return path


def preset_with_layers(name: str, layers: int | None) -> Preset:
    preset = PRESETS[name]
    return preset if layers is None else replace(preset, num_hidden_layers=layers)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--layers", type=int, help="only the first N decoder layers (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where the random numbers are drawn (cuda: much faster)")
    args = p.parse_args()
    if args.layers is not None and args.layers < 1:
        raise SystemExit("--layers must be >= 1")
    started = time.perf_counter()
    written = write_checkpoint(preset_with_layers(args.preset, args.layers), args.out, args.seed, args.device)
    print(json.dumps({**written, "seconds": round(time.perf_counter() - started, 1), "out": str(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
