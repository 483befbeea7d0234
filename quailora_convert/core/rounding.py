"""Choosing quantization codes on a fixed grid: round-to-nearest, or GPTQ with error feedback through H^-1.

The grid is what a bitsandbytes file stores: a table of levels (NF4's 16 values, or int8's -127..127)
and, for every weight, the scale it is multiplied by at load (per block of 64 for NF4, per row for int8).
Scales stay the ones bnb computed from the original W; only the codes change, so a file packed from
these codes is a file bnb itself could have written.

    W (out, in)       the weight to quantize, float32
    H (in, in)        second moment of the layer's calibration inputs
    scales (out, in)  the dequantization scale of every weight
    levels (k,)       the code table, ascending; codes index into it
Dequantized weight: levels[codes] * scales * factor (a constant). Pure tensor math, no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .options import DEFAULT_GPTQ_DAMP

GPTQ_BLOCK = 128  # columns updated together before the lazy update of the rest (GPTQ's default)


@dataclass(frozen=True)
class CodeGrid:
    levels: Tensor  # (k,) ascending float32
    scales: Tensor  # (out, in) float32
    factor: float = 1.0  # a last multiplier, in the order the loader applies it (int8: 1/127 after SCB)

    def values(self, codes: Tensor) -> Tensor:
        """levels[codes] * scales * factor: (out, in) float32, as the loader computes it."""
        return self.levels[codes] * self.scales * self.factor

    def step(self) -> Tensor:
        """(out, in) the scale of one unit of level: what a weight is divided by to be rounded."""
        return self.scales * self.factor


def nearest_codes(target: Tensor, grid: CodeGrid) -> Tensor:
    """Codes (out, in) int64 of the level nearest to target / scale, per weight."""
    return _nearest(target.float() / grid.step(), grid.levels)


@dataclass(frozen=True)
class GptqFactor:
    """What GPTQ needs of H, computed once per input group and reused by every module and round."""

    order: Tensor  # (in,) int64: the columns in processing order
    U: Tensor  # (in, in) float32: upper Cholesky factor of the damped H^-1, rows and columns in that order


def gptq_factor(H: Tensor, damp: float = DEFAULT_GPTQ_DAMP, act_order: bool = True) -> GptqFactor:
    """With act_order the columns go in order of decreasing H diagonal (largest inputs first); the
    scales are fixed per weight, so any order yields codes on the same grid."""
    in_features = H.shape[0]
    order = torch.argsort(torch.diagonal(H), descending=True) if act_order else torch.arange(in_features)
    return GptqFactor(order.to(H.device), _inverse_cholesky_upper(H.double()[order][:, order], damp))


def gptq_codes(W: Tensor, factor: GptqFactor, grid: CodeGrid, block: int = GPTQ_BLOCK) -> Tensor:
    """Codes (out, in) chosen column by column, each column's rounding error fed forward to the
    columns not yet quantized through the Cholesky factor of the damped H^-1 (GPTQ, Frantar et al. 2022).
    """
    out_features, in_features = W.shape
    if factor.U.shape != (in_features, in_features):
        raise ValueError(f"H must be ({in_features}, {in_features}), got {tuple(factor.U.shape)}")
    order, U = factor.order.to(W.device), factor.U.to(W.device)  # (in,), (in, in) float32
    diagonal = torch.diagonal(U).tolist()  # python floats (exactly U's float32 values): no tensor indexing per column
    work = W.float()[:, order].clone()  # (out, in), columns in processing order
    steps_by_column = grid.step()[:, order].float().T.contiguous()  # (in, out): one contiguous row per column
    levels = grid.levels.float()
    midpoints = _midpoints(levels)
    codes = torch.empty(in_features, out_features, dtype=torch.int64, device=W.device)  # transposed while filled
    for start in range(0, in_features, block):
        stop = min(start + block, in_features)
        errors = torch.empty(stop - start, out_features, dtype=torch.float32, device=W.device)  # (block, out)
        for j in range(start, stop):
            column, step = work[:, j], steps_by_column[j]
            torch.bucketize(column / step, midpoints, out=codes[j])
            error = errors[j - start]
            torch.sub(column, levels[codes[j]] * step, out=error).div_(diagonal[j])  # (out,)
            work[:, j + 1:stop].sub_(error[:, None] * U[j, j + 1:stop][None, :])
        work[:, stop:].sub_(errors.T.contiguous() @ U[start:stop, stop:])  # (out, block) as GPTQ's lazy batch
    codes = codes.T
    result = torch.empty_like(codes)
    result[:, order] = codes
    return result


def _nearest(normalized: Tensor, levels: Tensor) -> Tensor:
    """Index of the nearest level (ascending levels) for every entry; ties go to the lower level."""
    return torch.bucketize(normalized.contiguous(), _midpoints(levels), right=False)


def _midpoints(levels: Tensor) -> Tensor:
    """(k-1,) the boundaries between ascending levels: a value rounds to the level whose cell holds it."""
    return ((levels[1:] + levels[:-1]) / 2).contiguous()


def _inverse_cholesky_upper(H: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1, float32; dead inputs get a unit diagonal."""
    H = H.clone()
    diagonal = torch.diagonal(H)
    dead = diagonal <= 0
    if bool(dead.all()):
        raise FloatingPointError("H is zero: the calibration data never reached this layer")
    H[dead, :] = 0
    H[:, dead] = 0
    diagonal[dead] = 1
    diagonal += damp * float(diagonal[~dead].mean())
    L = torch.linalg.cholesky(H)
    inverse = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(inverse, upper=True).float()
