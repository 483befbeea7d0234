"""Resolving MODEL to a local folder: a directory as is, or a Hub repo pinned to its commit."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInputError, UnsupportedModelError

# Everything a conversion reads besides the weight shards.
METADATA_PATTERNS = [
    "config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer*", "special_tokens_map.json",
    "added_tokens.json", "vocab*", "merges.txt", "*.model", "*.tiktoken", "chat_template*",
]
TOKENIZER_PATTERNS = [p for p in METADATA_PATTERNS if p not in ("config.json", "model.safetensors.index.json")]


@dataclass(frozen=True)
class ModelSource:
    folder: Path
    repo_id: str | None = None  # None for a local folder
    commit: str | None = None
    gguf: str | None = None  # the .gguf file MODEL named; folder is then a temporary dequantized copy


def resolve_model(model: str, revision: str | None = None, allow_pickle: bool = False,
                  trust_remote_code: bool = False) -> ModelSource:
    """MODEL as a local folder of safetensors weights (pickle weights only with allow_pickle)."""
    from .pickle_source import require_safetensors

    path = Path(model).expanduser()
    if path.is_dir():
        return ModelSource(require_safetensors(path.resolve(), allow_pickle))
    if path.is_file() and path.suffix.lower() == ".gguf":
        from .gguf_source import temporary_folder  # dequantized in full: GGUF cannot be streamed

        return ModelSource(temporary_folder(path), gguf=str(path.resolve()))
    if path.exists():
        raise BadInputError(f"MODEL {model} is a file; give a model folder with config.json and safetensors shards, a .gguf file, or a Hub id")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise BadInputError(f"MODEL {model}: no such folder")
    source = _download(model, revision, allow_pickle, trust_remote_code)
    return ModelSource(require_safetensors(source.folder, allow_pickle), source.repo_id, source.commit)


def _download(repo_id: str, revision: str | None, allow_pickle: bool, trust_remote_code: bool) -> ModelSource:
    """Config, tokenizer, index and the shards it lists (custom code only when trusted), at one commit."""
    from huggingface_hub import errors as hub
    from huggingface_hub import snapshot_download

    patterns = METADATA_PATTERNS + (["*.py"] if trust_remote_code else []) + (["pytorch_model.bin.index.json"] if allow_pickle else [])
    with _hub_errors(repo_id, revision):
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
        commit = folder.name  # snapshots/<commit sha>
        try:
            _download_shards(repo_id, commit, folder, "model.safetensors")
        except hub.RemoteEntryNotFoundError:
            if not allow_pickle:
                raise
            _download_shards(repo_id, commit, folder, "pytorch_model.bin")
    if not (folder / "config.json").exists():
        raise UnsupportedModelError(f"{repo_id} has no config.json: not a transformers model")
    return ModelSource(folder, repo_id, commit)


def _download_shards(repo_id: str, commit: str, folder: Path, single: str) -> None:
    from huggingface_hub import hf_hub_download

    index = folder / f"{single}.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [single]
    for shard in shards:
        hf_hub_download(repo_id, shard, revision=commit)


class _hub_errors:
    """Turns huggingface_hub's exceptions into one actionable line (gated before not-found: a subclass)."""

    def __init__(self, repo_id: str, revision: str | None):
        self.repo_id, self.revision = repo_id, revision

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        from huggingface_hub import errors as hub

        if error is None:
            return False
        messages = [
            (hub.GatedRepoError, f"{self.repo_id} is gated: accept its licence on huggingface.co and set HF_TOKEN"),
            (hub.RepositoryNotFoundError, f"{self.repo_id} not found on the Hub (private? set HF_TOKEN)"),
            (hub.RevisionNotFoundError, f"revision {self.revision!r} not found in {self.repo_id}"),
            (hub.RemoteEntryNotFoundError, f"{self.repo_id} has no safetensors weights (model.safetensors or its index); "
                                           "for pickle weights (pytorch_model.bin) pass --allow-pickle if you trust them"),
            (hub.LocalEntryNotFoundError, f"{self.repo_id} is not in the local HF cache and the Hub cannot be reached "
                                          "(offline? unset HF_HUB_OFFLINE or download it first)"),
        ]
        for exception_type, message in messages:
            if isinstance(error, exception_type):
                raise BadInputError(message) from error
        return False
