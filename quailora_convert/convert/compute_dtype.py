"""The dtype a bundle computes in (bnb_4bit_compute_dtype, and config.json's dtype): one that holds its values.

The declared dtype (config.json's, else the weights' stored one) is kept when it holds every value the loaded
bundle computes with: the tensors it keeps in full precision (embeddings, norms, biases, output head), every
quantized weight dequantized (its absmax scales), and the calibration activations seen at each targeted linear.
Otherwise the bundle computes in the first dtype that holds them (the weights' stored dtype, else float32) and
a warning names the tensor: a float16 config over float32 weights past 65504 would give inf/NaN logits.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

import torch

from ..core.value_range import Largest, holding_dtype, holds, largest_abs, largest_of
from ..sources.checkpoint import CheckpointReader, KeyMap

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ComputeDtype:
    dtype: torch.dtype  # what the bundle declares
    declared: torch.dtype  # what the source declared
    largest: Largest | None  # the largest value the bundle computes with

    @property
    def changed(self) -> bool:
        return self.dtype != self.declared


def choose_compute_dtype(declared: torch.dtype, stored: set[torch.dtype], values: Iterable[Largest]) -> ComputeDtype:
    """declared when it holds the largest of values; else the stored dtype (one kind only; bfloat16 for float16
    weights) or float32, with a warning naming the tensor."""
    largest = largest_of(values)
    if largest is None or holds(declared, largest.value):
        return ComputeDtype(declared, declared, largest)
    single = next(iter(stored)) if len(stored) == 1 else None
    wider = [torch.bfloat16 if single == torch.float16 else single, torch.float32]
    chosen = holding_dtype([d for d in wider if d is not None and d != declared], largest)
    log.warning("%s reaches %.4g, past the largest %s value (%.4g): the bundle computes in %s (config.json dtype "
                "and bnb_4bit_compute_dtype), not the %s the source declares, so that its outputs stay finite",
                largest.what, largest.value, _name(declared), torch.finfo(declared).max, _name(chosen),
                _name(declared))
    return ComputeDtype(chosen, declared, largest)


def module_values(reports: Iterable[dict]) -> list[Largest]:
    """From the report rows of the targeted linears: their dequantized weights and calibration activations."""
    values = []
    for row in reports:
        module = row["module"]
        values += [Largest(f"{module}.weight (dequantized)", row.get("weight_max_abs", 0.0)),
                   Largest(f"the calibration inputs of {module}", row.get("input_max_abs", 0.0)),
                   Largest(f"the calibration outputs of {module}", row.get("output_max_abs", 0.0))]
    return values


def kept_values(reader: CheckpointReader, key_map: KeyMap, reported: set[str]) -> list[Largest]:
    """Every other tensor the bundle holds, read from the checkpoint: embeddings, norms, biases, the output head,
    and the weights of quantized linears that have no report row (not targeted). reported: model keys to skip."""
    values = []
    for key in reader.keys():
        name = key_map.model_key(key)
        if key in key_map.to_model and name not in reported:
            values.append(Largest(name, largest_abs(reader.get(key))))
    reader.release()
    return values


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
