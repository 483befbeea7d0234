"""MODEL resolved to a local folder of safetensors weights, with the temporary folders it needs.

open_model() is a context manager: a local folder is used as is; a Hub repo is downloaded (only
what a conversion reads) and pinned to its commit; a .gguf file is dequantized and pickle weights
are converted into temporary folders that are removed when the block ends.
"""
from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

from ..errors import BadInputError
from .gguf import dequantized_gguf, is_gguf
from .hub import download_model
from .pickled import safetensors_weights


@dataclass(frozen=True)
class ModelSource:
    folder: Path
    repo_id: str | None = None  # None for a local folder
    commit: str | None = None
    gguf: str | None = None  # the .gguf file MODEL named; folder is then a temporary dequantized copy
    open_seconds: float = 0.0  # spent resolving it: downloading, dequantizing, converting


@contextmanager
def open_model(model: str, revision: str | None = None, allow_pickle: bool = False, trust_remote_code: bool = False,
               on_status: Callable[[str], None] = lambda message: None, metadata_only: bool = False,
               ) -> Iterator[ModelSource]:
    """MODEL as a local folder of safetensors weights (pickle weights only with allow_pickle).

    on_status hears about slow steps before they start (dequantizing a GGUF file). metadata_only:
    config, index and tokenizer are enough (a plan): no shard is downloaded or converted from pickle.
    """
    started = time.perf_counter()
    with ExitStack() as temporary:
        source = _resolve(model, revision, allow_pickle, trust_remote_code, on_status, temporary, metadata_only)
        yield replace(source, open_seconds=time.perf_counter() - started)


def _resolve(model: str, revision: str | None, allow_pickle: bool, trust_remote_code: bool,
             on_status: Callable[[str], None], temporary: ExitStack, metadata_only: bool) -> ModelSource:
    path = Path(model).expanduser()
    if path.is_dir() and metadata_only:
        return ModelSource(path.resolve())
    if path.is_dir():
        return ModelSource(temporary.enter_context(safetensors_weights(path.resolve(), allow_pickle)))
    if is_gguf(model):
        on_status("dequantizing the GGUF file (read in full, not streamed)")
        return ModelSource(temporary.enter_context(dequantized_gguf(path)), gguf=str(path.resolve()))
    if path.exists():
        raise BadInputError(f"MODEL {model} is a file; give a model folder with config.json and safetensors shards, "
                            "a .gguf file, or a Hub id")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise BadInputError(f"MODEL {model}: no such folder")
    folder, commit = download_model(model, revision, allow_pickle, trust_remote_code, metadata_only)
    if metadata_only:
        return ModelSource(folder, model, commit)
    return ModelSource(temporary.enter_context(safetensors_weights(folder, allow_pickle)), model, commit)
