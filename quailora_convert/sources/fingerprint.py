"""Which model a local source is, by its files: what a bundle's report records and `eval` checks again.

A file is fingerprinted by its size and the sha256 of its first and last MiB (a weight file is read in
two places, not whole), the rule the work folder's resume fingerprint uses for the same files.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

ENDS_BYTES = 1 << 20


def file_fingerprint(path: Path) -> list:
    """[size, sha256 hex of the first and last ENDS_BYTES] of one file."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(ENDS_BYTES))
        if size > 2 * ENDS_BYTES:
            f.seek(size - ENDS_BYTES)
            digest.update(f.read(ENDS_BYTES))
        elif size > ENDS_BYTES:
            digest.update(f.read())
    return [size, digest.hexdigest()]


def source_files_fingerprint(folder: Path, gguf: str | None = None) -> dict:
    """{"files": {name: [size, digest]}} of every file in a source folder (or of the .gguf file alone)."""
    files = [Path(gguf)] if gguf else sorted(p for p in Path(folder).iterdir() if p.is_file())
    return {"files": {p.name: file_fingerprint(p) for p in files}}


def changed_files(recorded: dict, folder: Path, gguf: str | None = None) -> list[str]:
    """The files of a recorded {"files": ...} fingerprint that are missing from folder (or the .gguf file) or
    differ now, by name: empty when it is the same model. Files added since are not the model's."""
    base = Path(gguf).parent if gguf else Path(folder)
    changed = []
    for name, fingerprint in sorted(recorded.get("files", {}).items()):
        path = base / name
        if not path.is_file():
            changed.append(f"{name} (missing)")
        elif file_fingerprint(path) != list(fingerprint):
            changed.append(name)
    return changed
