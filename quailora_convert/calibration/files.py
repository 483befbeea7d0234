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


def read_file_texts(path: Path, option: str = "--calib") -> list[str]:
    """Every record of the file as text (a .txt file is one document), as FileTexts naming the file.

    Messages name a record by where an editor shows it: a .jsonl record by its line (1-based, blank lines
    counted), a .json record by its position in the list (1-based); option is the one that named the file."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return FileTexts([read_text_file(path)], str(path))
    if suffix == ".jsonl":
        records = []
        for n, line in enumerate(read_text_file(path).splitlines(), 1):
            if line.strip():
                where = f"{path} line {n}"
                records.append((where, _parse_json(line, where, one_line=True)))
    elif suffix == ".json":
        listed = _parse_json(read_text_file(path), str(path))
        if not isinstance(listed, list):
            raise BadInputError(f"{path}: expected a JSON list of records")
        records = [(f"{path} record {i} of {len(listed)}", r) for i, r in enumerate(listed, 1)]
    else:
        raise BadInputError(f"{option} {path}: unsupported extension {suffix!r}; "
                            f"use {', '.join(SUFFIXES[:-1])} or {SUFFIXES[-1]}")
    texts = [format_record(record, where) for where, record in records]
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


def _parse_json(text: str, where: str, one_line: bool = False) -> object:
    """one_line: text is one line of a .jsonl file (where names the line): the error's column only."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"col {e.colno}" if one_line else f"line {e.lineno} col {e.colno}"
        raise BadInputError(f"{where}: invalid JSON ({e.msg} at {at})") from e
