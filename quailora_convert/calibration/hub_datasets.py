"""Calibration text from Hugging Face Hub datasets: the paper's presets and any `org/name` id.

A preset is data: the dataset repo, its data files per split (glob patterns in the repo, as the
repo lays them out), the `datasets` builder that reads them, and a formatter turning one record
into plain training-style text. Files are resolved through huggingface_hub (pinned to the commit,
only the split's files downloaded, the HF cache used as is offline) and read with `datasets` from
the local copies. Of a split's records only a seeded random selection is turned into Python
objects: the Arrow table is memory-mapped, so a 500k-record split costs disk, not memory.

This module never imports `datasets` at import time (it pulls in pyarrow and pandas).
"""
from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from ..errors import BadInputError
from .files import SUFFIXES as LOCAL_SUFFIXES
from .formats import (format_alpaca, format_chosen, format_conversations, format_dialog, format_prompt_completion,
                      format_text)

log = logging.getLogger(__name__)

# extension (before any compression suffix) -> `datasets` packaged builder
BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text"}
COMPRESSIONS = {".gz", ".bz2", ".xz", ".zst", ".lz4"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class HubPreset:
    """Where a paper calibration set lives on the Hub and how one record becomes text."""

    repo_id: str
    data_files: dict[str, tuple[str, ...]]  # split -> glob patterns relative to the repo root
    formatter: Callable[[dict], str]
    revision: str | None = None  # None: the default branch
    note: str = ""


HUB_PRESETS: dict[str, HubPreset] = {
    "alpaca": HubPreset("tatsu-lab/alpaca", {"train": ("data/train-*.parquet",)}, format_alpaca,
                        note="instruction/input/output in the Alpaca prompt"),
    "chip2": HubPreset("laion/OIG", {"train": ("unified_chip2.jsonl",)}, format_text,
                       note="OIG-small-chip2: '<human>: ...\\n<bot>: ...' dialogs"),
    # The repo's main branch holds only a loading script; the Hub's parquet export is the data.
    "self-instruct": HubPreset("yizhongw/self_instruct", {"train": ("self_instruct/train/*.parquet",)},
                               format_prompt_completion, revision="refs/convert/parquet", note="prompt + completion"),
    "hh-rlhf": HubPreset("Anthropic/hh-rlhf", {"train": ("*/train.jsonl.gz",), "test": ("*/test.jsonl.gz",)},
                         format_chosen, note="the chosen dialogs of the four helpful/harmless subsets"),
    "slimorca": HubPreset("Open-Orca/SlimOrca", {"train": ("oo-labeled_correct.gpt4.sharegpt.jsonl",)},
                          format_conversations, note="system/human/gpt turns as a dialog"),
}


def looks_like_hub_id(source: str) -> bool:
    """`org/name` that is not a local path: no leading '/' or '.', no calibration-file suffix."""
    return bool(HUB_ID.match(source)) and PurePosixPath(source).suffix.lower() not in LOCAL_SUFFIXES


def load_preset_texts(name: str, preset: HubPreset, split: str | None = None, max_records: int | None = None,
                      seed: int = 0) -> list[str]:
    """Texts of a preset's split: at most max_records records, a random selection drawn with seed."""
    split = split or "train"
    if split not in preset.data_files:
        raise BadInputError(f"--calib {name}: no split {split!r} (splits: {', '.join(preset.data_files)})")
    what = f"--calib {name} ({preset.repo_id})"
    commit, files = _repo_files(preset.repo_id, preset.revision, what)
    wanted = _match(preset.data_files[split], files)
    if not wanted:
        raise BadInputError(f"{what}: no file matches {', '.join(preset.data_files[split])} at {commit[:12]}"
                            + (f" (cached: {', '.join(sorted(files)[:5])})" if _offline() else ""))
    dataset = _load(preset.repo_id, commit, wanted, what)
    return _select_texts(dataset, preset.formatter, max_records, seed, what)


def load_hub_texts(repo_id: str, split: str | None = None, field: str | None = None, max_records: int | None = None,
                   seed: int = 0) -> list[str]:
    """Texts of any Hub dataset: the default config's files of `split`, one column or auto-detected."""
    split = split or "train"
    what = f"--calib {repo_id}"
    commit, files = _repo_files(repo_id, None, what)
    splits = _split_patterns(repo_id, commit, files, what)
    if split not in splits:
        raise BadInputError(f"{what}: no split {split!r}; --calib-split one of: {', '.join(splits) or 'none found'}")
    wanted = [f for f in _match(splits[split], files) if _builder(f)]
    if not wanted:
        raise BadInputError(f"{what}: split {split!r} has no parquet/json/jsonl/csv/txt data files")
    dataset = _load(repo_id, commit, wanted, what)
    return _select_texts(dataset, _column_formatter(dataset.column_names, field, what), max_records, seed, what)


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def _repo_files(repo_id: str, revision: str | None, what: str) -> tuple[str, list[str]]:
    """(commit sha, repo-relative file paths): the Hub's listing, or offline the cached snapshot's."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    try:
        if not _offline():
            info = HfApi().dataset_info(repo_id, revision=revision)
            return info.sha, [s.rfilename for s in info.siblings or []]
        folder = Path(snapshot_download(repo_id, repo_type="dataset", revision=revision, local_files_only=True))
    except GatedRepoError as e:
        raise BadInputError(f"{what} is gated: accept its terms on huggingface.co and set HF_TOKEN") from e
    except RevisionNotFoundError as e:
        raise BadInputError(f"{what}: revision {revision!r} not found on the Hub") from e
    except RepositoryNotFoundError as e:
        raise BadInputError(f"{what}: dataset not found on the Hub (or private: set HF_TOKEN)") from e
    except LocalEntryNotFoundError as e:
        raise _not_cached(what) from e
    files = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
    return folder.name, files


def _not_cached(what: str) -> BadInputError:
    from huggingface_hub import constants

    return BadInputError(f"{what} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set: "
                         f"run once with network access or unset HF_HUB_OFFLINE")


def _match(patterns, files: list[str]) -> list[str]:
    """Repo files matching any glob pattern (fsspec semantics, as `datasets` resolves them)."""
    from fsspec.utils import glob_translate

    regexes = [re.compile(glob_translate(p)) for p in patterns]
    return [f for f in files if any(r.fullmatch(f) for r in regexes)]


def _builder(path: str) -> str | None:
    suffixes = [s.lower() for s in PurePosixPath(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes.pop()
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def _split_patterns(repo_id: str, commit: str, files: list[str], what: str) -> dict[str, list[str]]:
    """split -> patterns: the dataset card's default config, else `datasets`' file-name conventions."""
    from datasets.data_files import _get_data_files_patterns, sanitize_patterns
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard
    from huggingface_hub.constants import REPOCARD_NAME

    if REPOCARD_NAME in files:
        card = DatasetCard.load(_download(repo_id, commit, REPOCARD_NAME, what), repo_type="dataset")
        configs = MetadataConfigs.from_dataset_card_data(card.data)
        if configs:
            name = configs.get_default_config_name() or next(iter(configs))
            if "data_files" in configs[name]:
                log.info("%s: using config %r of %s", what, name, ", ".join(configs))
                return {str(k): list(v) for k, v in sanitize_patterns(configs[name]["data_files"]).items()}
    data = [f for f in files if _builder(f)]
    try:
        return {str(k): list(v) for k, v in _get_data_files_patterns(lambda p: _match([p], data)).items()}
    except FileNotFoundError:
        return {}


def _download(repo_id: str, commit: str, filename: str, what: str) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return hf_hub_download(repo_id, filename, repo_type="dataset", revision=commit)
    except LocalEntryNotFoundError as e:
        raise _not_cached(f"{what} file {filename}") from e


def _load(repo_id: str, commit: str, files: list[str], what: str):
    """One `datasets.Dataset` (memory-mapped Arrow) over the local copies of `files`."""
    import datasets

    builders = {_builder(f) for f in files}
    if len(builders) != 1 or None in builders:
        raise BadInputError(f"{what}: cannot read {', '.join(files)} as one table (parquet, json, csv or txt)")
    local = [_download(repo_id, commit, f, what) for f in files]
    log.info("%s @ %s: reading %s", what, commit[:12], ", ".join(files))
    try:
        return datasets.load_dataset(builders.pop(), data_files={"train": local}, split="train")
    except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as e:
        raise BadInputError(f"{what}: cannot read {', '.join(files)}: {str(e).splitlines()[0] if str(e) else e!r}") from e


def _column_formatter(columns: list[str], field: str | None, what: str) -> Callable[[dict], str]:
    if field is not None:
        if field not in columns:
            raise BadInputError(f"{what}: no column {field!r}; --calib-field one of: {', '.join(columns)}")
        return lambda record: _as_text(record.get(field))
    if {"instruction", "output"} <= set(columns):
        return format_alpaca
    if "text" in columns:
        return format_text
    raise BadInputError(f"{what}: no Alpaca (instruction/input/output) or 'text' column; "
                        f"choose one with --calib-field from: {', '.join(columns)}")


def _as_text(value) -> str:
    if isinstance(value, list) and all(isinstance(t, dict) for t in value):
        return format_dialog(value)  # a chat column: list of turns
    return "" if value is None else str(value).strip()


def _select_texts(dataset, formatter: Callable[[dict], str], max_records: int | None, seed: int, what: str) -> list[str]:
    """Formatted texts of a seeded random selection of at most max_records records (all when None)."""
    n = len(dataset)
    if max_records is not None and max_records < n:
        dataset = dataset.select(random.Random(seed).sample(range(n), max_records))
    texts = [t for t in (formatter(record) for record in dataset) if t]
    if not texts:
        raise BadInputError(f"{what}: the selected records format to empty text")
    return texts

