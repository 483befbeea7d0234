"""What a --calib (or eval --data) value names: a preset, a Hub dataset id or a local file."""
from __future__ import annotations

from pathlib import Path

from ..errors import BadInputError
from .files import read_file_texts
from .hub_datasets import HUB_PRESETS, load_hub_texts, load_preset_texts, looks_like_hub_id


def read_texts(source: str, split: str | None = None, field: str | None = None, max_records: int | None = None,
               seed: int = 0, option: str = "--calib") -> list[str]:
    """Formatted calibration documents from a preset, a Hub dataset id or a local .json/.jsonl/.txt file.

    split/field apply to Hub datasets (field not to presets, which have their own formatter); of a Hub
    split at most max_records records, drawn with seed, are read. Local files are read whole. option: the
    command-line option that named source (--calib, eval's --data), as the messages name it.
    """
    preset = HUB_PRESETS.get(source)
    if preset is not None:
        if field is not None:
            raise BadInputError(f"--calib-field does not apply to the preset {source!r} (it has its own formatter)")
        return load_preset_texts(source, preset, split, max_records, seed)
    path = Path(source)
    if not path.exists() and looks_like_hub_id(source):
        return load_hub_texts(source, split, field, max_records, seed)
    if path.is_file() and (split is not None or field is not None):
        raise BadInputError(f"--calib-split/--calib-field apply to Hub datasets, not to the file {source}")
    check_text_source(source, option)
    return read_file_texts(path, option)


def check_text_source(source: str, option: str = "--calib") -> None:
    """Without reading anything: BadInputError when source names no preset, no Hub dataset id and no file (a
    caller checks this before loading any library or model)."""
    path = Path(source)
    if source in HUB_PRESETS or (not path.exists() and looks_like_hub_id(source)) or path.is_file():
        return
    raise BadInputError(f"{option} {source!r} is not a file; give a .json, .jsonl or .txt file, a Hub dataset "
                        f"id org/name, or a preset ({', '.join(sorted(HUB_PRESETS))})")
