"""A real tiny bundle for the publish / card / inspect tests: converted from a random Llama in seconds."""
from __future__ import annotations

from pathlib import Path

from quailora_convert.convert import ConvertSettings, convert
from tiny_models import save_tiny, tiny_llama_config, write_text_calibration

SOURCE_CARD = """---
license: apache-2.0
language:
- en
- fr
tags:
- tiny
---
# A tiny source model
"""


def make_bundle(root: Path, **settings) -> tuple[Path, Path]:
    """(source folder with a README.md card, bundle folder); max_shard_bytes small enough for an index."""
    source = save_tiny(tiny_llama_config(), root / "source")
    (source / "README.md").write_text(SOURCE_CARD)
    calib = write_text_calibration(root / "calib.jsonl")
    values = dict(model=str(source), out=root / "bundle", calib=str(calib), rank=4, num_samples=8, seq_len=32,
                  batch_size=4, max_shard_bytes=150_000)
    values.update(settings)
    return source, convert(ConvertSettings(**values))
