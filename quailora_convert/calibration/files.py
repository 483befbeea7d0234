"""Calibration text from a local file: Alpaca .json/.jsonl, text .jsonl (a `text` field) or .txt."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import BadInputError
from .formats import format_alpaca

SUFFIXES = (".json", ".jsonl", ".txt")  # what a local --calib file can be


class FileTexts(list):
    """The texts of one file, a list that also says where it came from (for messages about the data)."""

    def __init__(self, texts: list[str], source: str):
        super().__init__(texts)
        self.source = source


def read_file_texts(path: Path) -> list[str]:
    """Every record of the file as text (a .txt file is one document), as FileTexts naming the file."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return FileTexts([read_text_file(path)], str(path))
    if suffix == ".jsonl":
        records = []
        for n, line in enumerate(read_text_file(path).splitlines(), 1):
            if line.strip():
                records.append(_parse_json(line, f"{path}:{n}"))
    elif suffix == ".json":
        records = _parse_json(read_text_file(path), str(path))
        if not isinstance(records, list):
            raise BadInputError(f"{path}: expected a JSON list of records")
    else:
        raise BadInputError(f"--calib {path}: unsupported extension {suffix!r}; "
                            f"use {', '.join(SUFFIXES[:-1])} or {SUFFIXES[-1]}")
    texts = [format_record(r, f"{path} record {i}") for i, r in enumerate(records)]
    if not texts:
        raise BadInputError(f"{path} has no records")
    return FileTexts(texts, str(path))


def read_text_file(path: Path) -> str:
    """The file's text; BadInputError naming it when it is binary (not UTF-8, or NUL bytes) rather than text."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInputError(f"{path} is not UTF-8 text (undecodable byte 0x{data[e.start]:02x} at offset {e.start}): "
                            f"give a plain-text {', '.join(SUFFIXES)} file, or re-save it as UTF-8") from e
    if "\x00" in text:
        raise BadInputError(f"{path} is a binary file (it holds NUL bytes), not text: "
                            f"give a plain-text {', '.join(SUFFIXES)} file")
    return text.removeprefix("\ufeff")  # a UTF-8 byte order mark is not part of the text


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
