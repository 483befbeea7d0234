"""Calibration text: reading sources, seeded sampling, tokenisation into padded batches."""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import calib_presets
from .errors import BadInputError

log = logging.getLogger(__name__)

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n{output}"
)

# Named sources plug in here: name -> function returning the formatted texts, or a Hub preset
# (calib_presets.HubPreset: dataset, files, formatter as data) read with a seeded record selection.
CALIBRATION_PRESETS: dict[str, Callable[[], list[str]] | calib_presets.HubPreset] = dict(calib_presets.HUB_PRESETS)


@dataclass
class CalibrationBatch:
    input_ids: torch.Tensor  # (batch, seq) right-padded
    attention_mask: torch.Tensor  # (batch, seq) 1 for real tokens

    @property
    def token_mask(self) -> torch.Tensor:
        return self.attention_mask.bool()


def format_alpaca(record: dict) -> str:
    template = ALPACA_PROMPT if str(record.get("input") or "").strip() else ALPACA_PROMPT_NO_INPUT
    return template.format(
        instruction=record.get("instruction", ""), input=record.get("input", ""), output=record.get("output", ""),
    )


def format_record(record: object, where: str) -> str:
    if isinstance(record, dict) and "instruction" in record:
        return format_alpaca(record)
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    raise BadInputError(f"{where}: expected Alpaca records (instruction/input/output) or a 'text' field")


def read_texts(source: str, split: str | None = None, field: str | None = None, max_records: int | None = None,
               seed: int = 0) -> list[str]:
    """Formatted calibration documents from a preset, a Hub dataset id or a local .json/.jsonl/.txt file.

    split/field apply to Hub datasets (field not to presets, which have their own formatter); of a Hub
    split at most max_records records, drawn with seed, are read. Local files are read whole.
    """
    preset = CALIBRATION_PRESETS.get(source)
    if preset is not None and field is not None:
        raise BadInputError(f"--calib-field does not apply to the preset {source!r} (it has its own formatter)")
    if isinstance(preset, calib_presets.HubPreset):
        return calib_presets.load_preset_texts(source, preset, split, max_records, seed)
    if preset is not None:
        return preset()
    path = Path(source)
    if not path.exists() and calib_presets.looks_like_hub_id(source):
        return calib_presets.load_hub_texts(source, split, field, max_records, seed)
    if path.is_file() and (split is not None or field is not None):
        raise BadInputError(f"--calib-split/--calib-field apply to Hub datasets, not to the file {source}")
    if not path.is_file():
        presets = ", ".join(sorted(CALIBRATION_PRESETS)) or "none yet"
        raise BadInputError(f"--calib {source!r} is not a file; give a .json, .jsonl or .txt file, a Hub dataset "
                            f"id org/name, or a preset ({presets})")
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
        raise BadInputError(f"--calib {path}: unsupported extension {suffix!r}; use .json, .jsonl or .txt")
    texts = [format_record(r, f"{path} record {i}") for i, r in enumerate(records)]
    if not texts:
        raise BadInputError(f"{path} has no records")
    return texts


def _parse_json(text: str, where: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInputError(f"{where}: invalid JSON ({e.msg} at line {e.lineno})") from e


def sample_token_sequences(texts: list[str], tokenizer, num_samples: int, seq_len: int, seed: int) -> list[list[int]]:
    """num_samples token sequences of at most seq_len, drawn reproducibly with seed.

    One document gives one sample (truncated); a single long document (.txt) is cut into
    seq_len windows first.
    """
    if num_samples < 1 or seq_len < 2:
        raise BadInputError("--num-samples must be >= 1 and --seq-len >= 2")
    if len(texts) == 1:
        ids = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
        sequences = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    else:
        sequences = [tokenizer(t, truncation=True, max_length=seq_len)["input_ids"] for t in texts]
    sequences = [s for s in sequences if len(s) >= 2]
    if not sequences:
        raise BadInputError("the calibration data tokenizes to nothing")
    rng = random.Random(seed)
    if len(sequences) < num_samples:
        log.warning("calibration source has %d samples, fewer than --num-samples %d: using all",
                    len(sequences), num_samples)
        return rng.sample(sequences, len(sequences))
    return rng.sample(sequences, num_samples)


def pad_token_id(tokenizer) -> int:
    """The id used for padding (masked out everywhere): pad, else eos, else 0."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id or 0


def make_batches(sequences: list[list[int]], batch_size: int, pad_id: int) -> list[CalibrationBatch]:
    """Right-padded batches; the attention mask marks the real tokens."""
    batches = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        batches.append(CalibrationBatch(ids, mask))
    return batches
