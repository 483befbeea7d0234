"""What an evaluation is asked to do: every `eval` option and its default, in one place.

Importing this module costs nothing (no torch): the CLI builds its options from it before any command runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class EvalSettings:
    bundle: Path
    data: str | None = None  # file, preset or "self"; None: "self" when the source is available
    num_samples: int = 32
    seq_len: int = 256
    source: str | None = None  # default: the MODEL the report names
    batch_size: int = 8
    seed: int = 1234
    json_path: Path | None = None
    skip_source: bool = False  # only the two bundle rows
    replace_eval: bool = False  # a result with fewer rows may replace the bundle's quailora_eval.json
