"""The dtype a bundle computes in (bnb_4bit_compute_dtype, and config.json's dtype): one that holds its values.

A loaded bundle runs its 4-bit layers in the compute dtype, and everything else (embeddings, norms, the
residual stream, the output head) in the dtype its full-precision tensors are stored in: transformers loads a
pre-quantized checkpoint's other tensors as they are stored. So

- the calibration activations seen at each targeted linear (its inputs and outputs) must be held by the dtypes
  the kept tensors are stored in: else no compute dtype helps, and the bundle is refused with the tensor named
  (the source overflows in its own dtype too);
- the compute dtype must hold those activations and every quantized weight dequantized (its absmax scales):
  the declared one (config.json's, else the weights' stored one) is kept when it does; otherwise the bundle
  computes in the first dtype that does (the weights' stored dtype, bfloat16 for float16 weights, else
  float32) and a warning names the tensor (a float16 config over float32 weights past 65504).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable

import torch

from ..core.value_range import Largest, holding_dtype, holds, largest_abs, largest_of
from ..errors import SourceMustChange
from ..sources.checkpoint import CheckpointReader, KeyMap

log = logging.getLogger(__name__)


@dataclass
class BundleValues:
    """The largest values a bundle computes with, and the dtypes its full-precision tensors are stored in."""

    values: list[Largest] = field(default_factory=list)
    kept_dtypes: set[torch.dtype] = field(default_factory=set)


@dataclass(frozen=True)
class ComputeDtype:
    dtype: torch.dtype  # what the bundle declares
    declared: torch.dtype  # what the source declared
    largest: Largest | None  # the largest value the bundle computes with

    @property
    def changed(self) -> bool:
        return self.dtype != self.declared


def choose_compute_dtype(declared: torch.dtype, stored: set[torch.dtype], found: BundleValues) -> ComputeDtype:
    """declared when it holds every value found; else the stored dtype (one kind only; bfloat16 for float16
    weights) or float32, with a warning naming the tensor. SourceMustChange when an activation is past what the
    kept tensors' dtype holds."""
    _refuse_overflowing_activations(found)
    largest = largest_of(found.values)
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


def _refuse_overflowing_activations(found: BundleValues) -> None:
    for dtype in sorted(found.kept_dtypes, key=lambda d: torch.finfo(d).max):
        largest = largest_of(v for v in found.values if v.activation)
        if largest is not None and not holds(dtype, largest.value):
            raise SourceMustChange(
                f"{largest.what} reach {largest.value:.4g}, past the largest {_name(dtype)} value "
                f"({torch.finfo(dtype).max:.4g}): the bundle would keep its embeddings and norms in {_name(dtype)} "
                f"as the source stores them, and compute inf there (so does the source in {_name(dtype)}); store "
                "the source's weights in bfloat16 or float32 and convert that")


def module_values(reports: Iterable[dict]) -> list[Largest]:
    """From the report rows of the targeted linears: their dequantized weights and calibration activations."""
    values = []
    for row in reports:
        module = row["module"]
        values += [Largest(f"{module}.weight (dequantized)", row.get("weight_max_abs", 0.0)),
                   Largest(f"the calibration inputs of {module}", row.get("input_max_abs", 0.0), activation=True),
                   Largest(f"the calibration outputs of {module}", row.get("output_max_abs", 0.0), activation=True)]
    return values


def bundle_values(reports: Iterable[dict], reader: CheckpointReader, key_map: KeyMap, quantized: set[str],
                  reported: set[str]) -> BundleValues:
    """The report rows' values, and every other tensor the bundle holds read from the checkpoint: embeddings,
    norms, biases, the output head, the weights of quantized linears without a report row (not targeted).
    quantized: the model keys of the weights stored 4/8-bit; reported: those with a report row (not read again)."""
    found = BundleValues(module_values(reports))
    for key in reader.keys():
        name = key_map.model_key(key)
        if key in key_map.to_model and name not in reported:
            tensor = reader.get(key)
            found.values.append(Largest(name, largest_abs(tensor)))
            if tensor.is_floating_point() and name not in quantized:
                found.kept_dtypes.add(tensor.dtype)
    reader.release()
    return found


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
