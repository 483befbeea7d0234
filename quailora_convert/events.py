"""Progress the library reports while it works: one small frozen dataclass per kind of event.

convert() and evaluate() call a listener (any callable taking an Event) with these; the library
draws nothing itself. A listener that meets a type it does not know should fail loudly: the CLI's
progress adapter raises, and a test checks that it handles every type in EVENT_TYPES.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union


@dataclass(frozen=True)
class Status:
    """A slow phase starts (dequantizing a GGUF file, capturing activations, generating text)."""

    message: str


@dataclass(frozen=True)
class SourceResolved:
    """MODEL is a local folder now: the folder, and where it came from."""

    folder: Path
    repo_id: str | None
    commit: str | None
    gguf: str | None  # the .gguf file MODEL named; folder is then its dequantized copy


@dataclass(frozen=True)
class TextGenerated:
    """The model sampling its own text (--calib self, eval --data self): done of total samples."""

    done: int
    total: int


@dataclass(frozen=True)
class Calibrated:
    """The calibration batches went through the model front; layer 0's inputs are captured."""

    samples: int
    seconds: float


@dataclass(frozen=True)
class LayerConverted:
    """Decoder layer `index` (0-based) of `count` is quantized, solved and written."""

    index: int
    count: int
    seconds: float


@dataclass(frozen=True)
class ConversionDone:
    out: Path
    report: dict  # the bundle's quailora_report.json


@dataclass(frozen=True)
class EvalModelStarted:
    """evaluate() loads the index-th (0-based) of count models."""

    model: str
    index: int
    count: int


@dataclass(frozen=True)
class EvalBatchDone:
    model: str
    done: int
    total: int


@dataclass(frozen=True)
class EvalRowDone:
    model: str
    perplexity: float


@dataclass(frozen=True)
class EvalDone:
    result: dict  # what quailora_eval.json holds


Event = Union[Status, SourceResolved, TextGenerated, Calibrated, LayerConverted, ConversionDone, EvalModelStarted,
              EvalBatchDone, EvalRowDone, EvalDone]
EVENT_TYPES: tuple[type, ...] = Event.__args__
Listener = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The listener that listens to nothing (the default)."""
