"""Calibrated NF4 block scales: each block's absmax chosen under H, stored in bitsandbytes' exact format.

bitsandbytes NF4 stores per block of 64 weights (along the flattened row-major weight, i.e. along `in` within
a row) a scale that the loader multiplies the block's 16-level codes by; nothing forces it to be the block's
true maximum. A smaller scale clips the block's outliers to the end levels but rounds the rest more finely
(AWQ/OmniQuant-style clipping). Per block we try shrink factors alpha of its absmax with round-to-nearest
codes and keep the one with the least diagonal-H error sum_j H_jj e_j^2 (vectorised over all blocks).

The chosen scales are then double-quantized exactly as bitsandbytes does (offset = their mean, 8-bit dynamic
codes per 256 blocks) and the codes recomputed against the stored (dequantized) scales, so what is evaluated is
what the file holds. Guarantee: the full calibrated error tr(E H E^T) of the result never exceeds that of
bitsandbytes' own round-to-nearest: each row keeps bnb's absmax where the search did worse on it, and the
whole module falls back to bnb's own bytes if the combination still does.

    W (out, in)  the weight as stored (the dtype bnb quantizes), compared in float32
    H (in, in)   second moment of its calibration inputs
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .options import SHRINK_FACTORS
from .quantize import NF4_BLOCKSIZE, NF4Quantizer, QuantizedWeight
from .rounding import CodeGrid, nearest_codes

SEARCH_CHUNK = 1 << 16  # blocks searched together: 4M weights, ~16 MB per float32 temporary


@dataclass(frozen=True)
class ScaleChoice:
    """What calibrated_scales kept for one module."""

    scales: str  # "calibrated" (some rows on searched scales) or "absmax" (bitsandbytes' own base, unchanged)
    rows_calibrated: int  # rows whose blocks carry searched scales
    error_absmax: float  # calibrated error of bitsandbytes' round-to-nearest base
    error: float  # of the base kept (<= error_absmax)


def searched_absmax(W: Tensor, H_diagonal: Tensor, levels: Tensor,
                    shrink_factors: tuple[float, ...] = SHRINK_FACTORS, chunk: int = SEARCH_CHUNK) -> Tensor:
    """(blocks,) float32: per block of NF4_BLOCKSIZE the scale alpha * absmax (alpha in shrink_factors) whose
    round-to-nearest codes give the least sum_j H_jj (w_j - q_j)^2. Ties (dead inputs) keep the first factor.
    chunk blocks at a time, so the search's memory stays a few times chunk x 64 floats at any size."""
    in_features = W.shape[1]
    flat = W.float().reshape(-1)  # bnb's blocks run along the row-major flattened weight
    importance = H_diagonal.float().clamp(min=0)  # (in,)
    blocks = -(-flat.numel() // NF4_BLOCKSIZE)
    chosen = torch.empty(blocks, dtype=torch.float32, device=W.device)
    for start in range(0, blocks, chunk):
        stop = min(start + chunk, blocks)
        positions = torch.arange(start * NF4_BLOCKSIZE, stop * NF4_BLOCKSIZE, device=W.device)
        inside = positions < flat.numel()  # the last block's padding weighs nothing
        weights = torch.where(inside, flat[positions.clamp(max=flat.numel() - 1)], 0.0).view(-1, NF4_BLOCKSIZE)
        weighing = torch.where(inside, importance[positions % in_features], 0.0).view(-1, NF4_BLOCKSIZE)
        chosen[start:stop] = _best_scale(weights, weighing, levels, shrink_factors)
    return chosen


def _best_scale(weights: Tensor, weighing: Tensor, levels: Tensor, shrink_factors: tuple[float, ...]) -> Tensor:
    """(blocks,) the best alpha * absmax of each block of weights (blocks, 64) under the weights' H diagonal.

    On x = w / absmax the error of scale alpha * absmax is absmax * (x - alpha * level): per block the cost
    compares as sum_j H_jj (x_j - alpha * level_j)^2. A code is the number of midpoints below x / alpha (as
    bucketize counts them), counted with one comparison per midpoint (faster than bucketize on CPU)."""
    absmax = weights.abs().amax(dim=1, keepdim=True)  # (blocks, 1) what bnb stores before double quantization
    normalized = weights / torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # (blocks, 64) in [-1, 1]
    midpoints = ((levels[1:] + levels[:-1]) / 2).tolist()  # the cells' boundaries, as rounding.nearest_codes
    best_cost = torch.full_like(absmax[:, 0], float("inf"))
    best_factor = torch.ones_like(best_cost)
    codes = torch.empty(weights.shape, dtype=torch.uint8, device=weights.device)
    for alpha in shrink_factors:
        codes.zero_()
        for midpoint in midpoints:
            codes += normalized > alpha * midpoint
        cost = ((normalized - alpha * levels[codes.int()]).square_() * weighing).sum(dim=1)  # (blocks,)
        better = cost < best_cost
        best_cost = torch.where(better, cost, best_cost)
        best_factor = torch.where(better, torch.full_like(best_factor, alpha), best_factor)
    return absmax[:, 0] * best_factor


def calibrated_scales(W: Tensor, H: Tensor, quantizer: NF4Quantizer,
                      shrink_factors: tuple[float, ...] = SHRINK_FACTORS) -> tuple[QuantizedWeight, ScaleChoice]:
    """NF4 base of W (out, in) on searched block scales, never worse under H than bitsandbytes' own
    round-to-nearest (returned unchanged, bytes and all, when the search did not pay)."""
    out_features, in_features = W.shape
    target = W.float()
    own = quantizer.quantize(W)  # bitsandbytes' absmax and codes
    own_rows = _row_errors(target - own.dequantized.float(), H)  # (out,)
    levels = own.state.code.float().to(target.device)
    searched = searched_absmax(W, torch.diagonal(H), levels, shrink_factors)  # (blocks,)
    candidate = _on_absmax(W, searched, quantizer)
    rows_error = _row_errors(target - candidate.dequantized.float(), H)
    better_rows = rows_error < own_rows  # (out,)
    rows = int(better_rows.sum())
    if in_features % NF4_BLOCKSIZE == 0 and 0 < rows < out_features:  # rows own whole blocks: mix per row
        true_absmax = target.abs().view(-1, NF4_BLOCKSIZE).amax(dim=1)
        per_block = better_rows.repeat_interleave(in_features // NF4_BLOCKSIZE)
        candidate = _on_absmax(W, torch.where(per_block, searched, true_absmax), quantizer)
        rows_error = _row_errors(target - candidate.dequantized.float(), H)
    elif in_features % NF4_BLOCKSIZE:  # blocks span rows: the whole module is one choice
        rows = out_features
    error_absmax, error = float(own_rows.sum()), float(rows_error.sum())
    if not error < error_absmax:
        return own, ScaleChoice("absmax", 0, error_absmax, error_absmax)
    return candidate, ScaleChoice("calibrated", rows, error_absmax, error)


class CalibratedScalesQuantizer:
    """NF4Quantizer whose quantize(W) chooses the block scales under one module's H (calibrated_scales):
    grid, with_codes and the file format are NF4Quantizer's, so GPTQ and refinement run on the chosen scales.
    Made per module; choice holds what the last quantize kept."""

    def __init__(self, nf4: NF4Quantizer, H: Tensor):
        self.nf4, self.H = nf4, H
        self.bits, self.name = nf4.bits, nf4.name
        self.choice: ScaleChoice | None = None

    def quantize(self, W: Tensor) -> QuantizedWeight:
        quantized, self.choice = calibrated_scales(W, self.H, self.nf4)
        return quantized

    def grid(self, quantized: QuantizedWeight) -> CodeGrid:
        return self.nf4.grid(quantized)

    def with_codes(self, quantized: QuantizedWeight, codes: Tensor) -> QuantizedWeight:
        return self.nf4.with_codes(quantized, codes)

    def loader_options(self, compute_dtype: torch.dtype) -> dict:
        return self.nf4.loader_options(compute_dtype)

    def stored_bytes(self, out_features: int, in_features: int) -> int:
        return self.nf4.stored_bytes(out_features, in_features)


def _on_absmax(W: Tensor, absmax: Tensor, quantizer: NF4Quantizer) -> QuantizedWeight:
    """W's NF4 tensors with these block scales, double-quantized as bnb does, codes nearest to the stored ones."""
    scaled = QuantizedWeight({}, W, quantizer.state_for_absmax(W, absmax))  # no codes yet: only its grid is read
    return quantizer.with_codes(scaled, nearest_codes(W.float(), quantizer.grid(scaled)))


def _row_errors(E: Tensor, H: Tensor) -> Tensor:
    """(out,) float64 e_i H e_i^T per row of E (out, in): the rows' shares of tr(E H E^T)."""
    E = E.double()
    return ((E @ H.double()) * E).sum(dim=1)
