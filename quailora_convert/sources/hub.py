"""A model from the Hugging Face Hub: what a conversion reads, downloaded at one commit."""
from __future__ import annotations

from pathlib import Path

from ..bundle.layout import CONFIG, COPIED_FROM_SOURCE, SAFETENSORS_INDEX, SAFETENSORS_SINGLE, index_shards
from ..errors import BadInputError, UnsupportedModelError
from .pickled import PICKLE_INDEX, PICKLE_SINGLE

# Everything a conversion reads besides the weight shards.
METADATA_PATTERNS = [CONFIG, SAFETENSORS_INDEX, *COPIED_FROM_SOURCE]


def download_model(repo_id: str, revision: str | None, allow_pickle: bool, trust_remote_code: bool,
                   metadata_only: bool = False) -> tuple[Path, str]:
    """(snapshot folder, commit): config, tokenizer, index and the shards it lists (custom code only when trusted).

    metadata_only: no weight shard (a plan needs only the config, index and tokenizer).
    """
    from huggingface_hub import errors as hub
    from huggingface_hub import snapshot_download

    patterns = METADATA_PATTERNS + (["*.py"] if trust_remote_code else []) + ([PICKLE_INDEX] if allow_pickle else [])
    with _hub_errors(repo_id, revision):
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
        commit = folder.name  # snapshots/<commit sha>
        if not metadata_only:
            try:
                _download_shards(repo_id, commit, folder, SAFETENSORS_SINGLE)
            except hub.RemoteEntryNotFoundError:
                if not allow_pickle:
                    raise
                _download_shards(repo_id, commit, folder, PICKLE_SINGLE)
    if not (folder / CONFIG).exists():
        raise UnsupportedModelError(f"{repo_id} has no {CONFIG}: not a transformers model")
    return folder, commit


def _download_shards(repo_id: str, commit: str, folder: Path, single: str) -> None:
    from huggingface_hub import hf_hub_download

    index = folder / f"{single}.index.json"
    shards = index_shards(index) if index.exists() else [single]
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
