"""Quantize one weight and solve its correction together: the choice of codes, then alternating refinement.

    W (out, in)  the full-precision weight, float32 (exactly the stored values)
    H (in, in)   second moment of its calibration inputs
    Q            dequantized base weight; E = W - Q; M the rank-r correction
The objective throughout is the calibrated error of base plus adapter, tr((W - Q - M) H (W - Q - M)^T).

rounding "nearest" is bitsandbytes' own quantization; "gptq" keeps bnb's scales and chooses the codes
column by column with error feedback (core.rounding). Each refinement round re-rounds W - M on the same
grid with the same rounding, then re-solves M for the new E (a calibrated LoftQ); the best iterate is
kept, so refinement never makes the objective worse than the first solve.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .options import DEFAULT_GPTQ_DAMP, ROUNDINGS
from .quantize import QuantizedWeight, Quantizer
from .rounding import GptqFactor, gptq_codes, gptq_factor, nearest_codes
from .solvers import LowRank, calibrated_error


@dataclass
class Compensated:
    quantized: QuantizedWeight  # the base weight to store
    correction: LowRank  # its adapter
    error: Tensor  # (out, in) float32 W - dequantized, the E the correction was solved for
    error_nearest: float  # calibrated error of bnb's round-to-nearest, without adapter
    error_rounded: float  # calibrated error of the kept base, without adapter
    objective_rounds: list[float] = field(default_factory=list)  # with adapter: first solve, then each refinement
    kept_round: int = 0  # index into objective_rounds of the iterate stored
    calibrated_scale_rows: int = 0  # rows on block scales searched under H (core.scales); 0: bitsandbytes' absmax


def quantize_and_solve(W: Tensor, stored_dtype: torch.dtype, H: Tensor, quantizer: Quantizer,
                       solve_error: Callable[[Tensor], LowRank], rounding: str = "nearest", refine: int = 0,
                       gptq_damp: float = DEFAULT_GPTQ_DAMP, gptq: GptqFactor | None = None) -> Compensated:
    """Base codes and rank-r correction for W; solve_error(E) returns the correction of an error E.

    gptq: H's GPTQ factor, when the caller shares one between the modules of an input group
    (computed here from H and gptq_damp otherwise).
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; choose one of {', '.join(ROUNDINGS)}")
    if refine < 0:
        raise ValueError(f"refinement rounds must be >= 0, got {refine}")
    W = W.float()
    nearest = quantizer.quantize(W.to(stored_dtype))
    grid = quantizer.grid(nearest) if rounding == "gptq" or refine else None
    if rounding == "gptq" and gptq is None:
        gptq = gptq_factor(H, gptq_damp)

    def codes_for(target: Tensor) -> Tensor:
        if rounding == "gptq":
            return gptq_codes(target, gptq, grid)
        return nearest_codes(target, grid)

    quantized = quantizer.with_codes(nearest, codes_for(W)) if rounding == "gptq" else nearest
    best = last = _solved(W, quantized, H, solve_error)
    error_nearest = (last.error_value if quantized is nearest
                     else calibrated_error(W - nearest.dequantized.float(), H))
    rounds = [best.objective]
    kept = 0
    for round_index in range(1, refine + 1):
        target = W - last.correction.matrix().float()  # alternate from the last iterate, keep the best
        last = _solved(W, quantizer.with_codes(nearest, codes_for(target)), H, solve_error)
        rounds.append(last.objective)
        if last.objective < best.objective:
            best, kept = last, round_index
    error_rounded = best.error_value
    return Compensated(best.quantized, best.correction, best.error, error_nearest, error_rounded, rounds, kept)


@dataclass
class _Iterate:
    quantized: QuantizedWeight
    correction: LowRank
    error: Tensor  # (out, in) float32
    objective: float  # calibrated error with the correction
    error_value: float  # without it


def _solved(W: Tensor, quantized: QuantizedWeight, H: Tensor, solve_error: Callable[[Tensor], LowRank]) -> _Iterate:
    """One solve; its calibrated errors from the solver when it had them (the exact solve), else computed."""
    error = W - quantized.dequantized.float()  # (out, in)
    correction = solve_error(error)
    if correction.calibrated is not None:
        error_value, objective = correction.calibrated
    else:
        error_value = calibrated_error(error, H)
        objective = calibrated_error(error.double() - correction.matrix(), H)
    return _Iterate(quantized, correction, error, objective, error_value)

