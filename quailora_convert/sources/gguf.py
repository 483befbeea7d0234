"""A `.gguf` file as MODEL: dequantized by transformers into a temporary safetensors folder.

transformers (with the `gguf` package) reads a GGUF checkpoint only whole, so the file is
materialised in full (every tensor dequantized in memory, then written as sharded safetensors);
the streaming pipeline then reads that folder like any other. Memory is roughly the model's
size in float32 once, so this is meant for small models (demos, tests, laptops).
"""
from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from ..errors import BadInputError

log = logging.getLogger(__name__)
GGUF_SUFFIX = ".gguf"
DEFAULT_DTYPE = torch.bfloat16  # what the dequantized weights are stored as (the "full precision" source)


def is_gguf(model: str) -> bool:
    """MODEL names an existing .gguf file."""
    path = Path(model).expanduser()
    return path.suffix.lower() == GGUF_SUFFIX and path.is_file()


@contextmanager
def dequantized_gguf(gguf: Path) -> Iterator[Path]:
    """A temporary folder holding gguf dequantized to safetensors, removed when the block ends."""
    with tempfile.TemporaryDirectory(prefix="quailora-gguf-") as folder:
        yield materialize_gguf(gguf, Path(folder) / "model")


def materialize_gguf(gguf: Path, out: Path, dtype: torch.dtype = DEFAULT_DTYPE, shard_size: str = "200MB") -> Path:
    """Dequantize gguf into out (a folder of a temporary directory): config, tokenizer, shards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise BadInputError(f"MODEL {gguf}: no such GGUF file")
    try:
        with _transformers_progress_switch():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, OSError, KeyError, RuntimeError, ImportError) as e:
        raise BadInputError(f"MODEL {gguf.name}: transformers cannot read this GGUF file ({e})") from e
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the dequantized weights are plain tensors now
    config.dtype = dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in loaded.state_dict().items()}, assign=True, strict=False)
    model.tie_weights()
    del loaded
    model.save_pretrained(out, max_shard_size=shard_size)
    tokenizer.save_pretrained(out)
    log.info("dequantized %s into %s", gguf.name, out)
    return out


class _transformers_progress_switch:
    """transformers' GGUF reader uses a bare tqdm; route it through transformers' own progress-bar switch
    (transformers.utils.logging.disable_progress_bar) like the rest of its bars."""

    def __enter__(self):
        try:
            from transformers import modeling_gguf_pytorch_utils as module
            from transformers.utils import logging as hf_logging
        except ImportError:
            self.module = None
            return self
        self.module, self.original = module, getattr(module, "tqdm", None)
        if self.original is not None:
            module.tqdm = hf_logging.tqdm
        return self

    def __exit__(self, *exc):
        if self.module is not None and self.original is not None:
            self.module.tqdm = self.original
        return False
