"""Calibration texts -> seeded token sequences -> right-padded batches with their attention masks."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch

from ..errors import BadInputError

log = logging.getLogger(__name__)


@dataclass
class CalibrationBatch:
    input_ids: torch.Tensor  # (batch, seq) right-padded
    attention_mask: torch.Tensor  # (batch, seq) 1 for real tokens

    @property
    def token_mask(self) -> torch.Tensor:
        return self.attention_mask.bool()


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
