"""Whether a dtype holds a value: the range facts behind a bundle's compute dtype. Pure functions.

A loaded bundle computes its 4-bit layers in bnb_4bit_compute_dtype: their inputs are cast to it, the
dequantized weights (codes times the absmax scales) are made in it, their outputs are produced in it. A value
past the dtype's largest finite number (float16: 65504) becomes inf there, and the model's logits inf/NaN.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor


@dataclass(frozen=True)
class Largest:
    """The largest |value| of one tensor, named as a message should name it."""

    what: str  # "model.layers.0.mlp.down_proj.weight", "the calibration inputs of model.layers.0.mlp.down_proj"
    value: float
    activation: bool = False  # a value the model computes (not a weight it stores)


def largest_abs(tensor: Tensor) -> float:
    """max |tensor| as a float (0.0 for an empty or non-floating tensor)."""
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return 0.0
    return float(tensor.detach().abs().max().float())


def holds(dtype: torch.dtype, value: float) -> bool:
    """Whether value (and -value) stays finite when rounded to dtype."""
    return bool(torch.isfinite(torch.tensor(abs(value), dtype=torch.float64).to(dtype)))


def largest_of(values: Iterable[Largest]) -> Largest | None:
    return max(values, key=lambda v: v.value, default=None)


def holding_dtype(candidates: Iterable[torch.dtype], largest: Largest | None) -> torch.dtype:
    """The first of candidates that holds largest (every candidate holds nothing); the last when none does."""
    candidates = list(candidates)
    for dtype in candidates:
        if largest is None or holds(dtype, largest.value):
            return dtype
    return candidates[-1]
