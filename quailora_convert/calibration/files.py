"""Calibration text from a local file: Alpaca .json/.jsonl, text .jsonl (a `text` field) or .txt."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import BadInputError
from .formats import format_alpaca

SUFFIXES = (".json", ".jsonl", ".txt")  # what a local --calib file can be


def read_file_texts(path: Path) -> list[str]:
    """Every record of the file as text (a .txt file is one document)."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    if suffix == ".jsonl":
        records = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                records.append(_parse_json(line, f"{path}:{n}"))
    elif suffix == ".json":
        records = _parse_json(path.read_text(encoding="utf-8"), str(path))
        if not isinstance(records, list):
            raise BadInputError(f"{path}: expected a JSON list of records")
    else:
        raise BadInputError(f"--calib {path}: unsupported extension {suffix!r}; "
                            f"use {', '.join(SUFFIXES[:-1])} or {SUFFIXES[-1]}")
    texts = [format_record(r, f"{path} record {i}") for i, r in enumerate(records)]
    if not texts:
        raise BadInputError(f"{path} has no records")
    return texts


def format_record(record: object, where: str) -> str:
    if isinstance(record, dict) and "instruction" in record:
        return format_alpaca(record)
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    raise BadInputError(f"{where}: expected Alpaca records (instruction/input/output) or a 'text' field")


def _parse_json(text: str, where: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInputError(f"{where}: invalid JSON ({e.msg} at line {e.lineno})") from e
