"""Low-rank compensation of quantization error: pure tensor math, no I/O, no modules.

Notation follows QuAILoRA (arXiv 2410.14713). For one linear layer:
    E (out, in)  quantization error W - dequant(Q)
    H (in, in)   second moment of the layer's calibration inputs, H = X X^T / n
    M (out, in)  rank-r correction, M = left @ right with left (out, r) and right (r, in)
The calibrated error of a correction is tr((E - M) H (E - M)^T) = ||(E - M) X||_F^2 / n.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .options import DEFAULT_DAMP, SOLVERS


@dataclass(frozen=True)
class LowRank:
    """A rank-r matrix M = left @ right, both factors float64 with balanced singular values."""

    left: Tensor  # (out, r)
    right: Tensor  # (r, in)
    damped: int = 0  # eigenvalues of H raised to the damping floor

    def matrix(self) -> Tensor:
        return self.left @ self.right  # (out, in)


def calibrated_error(E: Tensor, H: Tensor) -> float:
    """tr(E H E^T) in float64: the mean squared output error ||E X||^2 / n."""
    E64, H64 = E.double(), H.double()
    return float(((E64 @ H64) * E64).sum())


def svd_init(E: Tensor, rank: int) -> LowRank:
    """Best rank-r approximation of E in the weight space (Frobenius norm): LoftQ-style."""
    E64 = _checked(E, rank)
    U, S, Vh = torch.linalg.svd(E64, full_matrices=False)
    return _balanced(U[:, :rank] * S[:rank], Vh[:rank])


@dataclass(frozen=True)
class DampedFactor:
    """H = V diag(root^2) V^T with eigenvalues below the floor raised to it: L = V diag(root)."""

    V: Tensor  # (in, in) float64 eigenvectors
    root: Tensor  # (in,) float64 square roots of the damped eigenvalues
    damped: int  # how many eigenvalues were raised to the floor


def factor_hessian(H: Tensor, in_features: int, damp: float = DEFAULT_DAMP) -> DampedFactor:
    """The damped factorisation solve_exact uses; compute it once to solve several E against one H."""
    eigenvalues, V, damped = _damped_eigh(H, in_features, damp)
    return DampedFactor(V, eigenvalues.sqrt(), damped)


def solve_exact(E: Tensor, H: Tensor, rank: int, damp: float = DEFAULT_DAMP) -> LowRank:
    """The closed-form minimiser of tr((E - M) H (E - M)^T) over rank-r M.

    With a damped factorisation H = L L^T, M = [E L]_r L^-1. L comes from eigh of H with every
    eigenvalue below damp * mean(eigenvalues) raised to that floor (the count is returned).
    """
    E64 = _checked(E, rank)
    return solve_factored(E64, factor_hessian(H, E64.shape[1], damp), rank)


def solve_factored(E: Tensor, factor: DampedFactor, rank: int) -> LowRank:
    """solve_exact with H already factored (factor_hessian)."""
    E64 = _checked(E, rank)
    V, root = factor.V, factor.root
    U, S, Vh = torch.linalg.svd((E64 @ V) * root, full_matrices=False)  # E L (out, in)
    right = (Vh[:rank] / root) @ V.T  # rows of [E L]_r L^-1
    low_rank = _balanced(U[:, :rank] * S[:rank], right)
    return LowRank(low_rank.left, low_rank.right, factor.damped)


def solve_als(E: Tensor, H: Tensor, rank: int, steps: int = 20) -> LowRank:
    """The paper's alternating least squares from the SVD of E (paper: 20 steps).

    left := E H right^T (right H right^T)^-1, then right := (left^T left)^-1 left^T E.
    Each step is an exact block minimisation, so the objective never increases.
    """
    if steps < 0:
        raise ValueError(f"ALS steps must be >= 0, got {steps}")
    E64 = _checked(E, rank)
    H64 = _checked_hessian(H, E64.shape[1])
    start = svd_init(E64, rank)
    left, right = start.left, start.right
    for _ in range(steps):
        HR = H64 @ right.T  # (in, r)
        left = _solve_right(E64 @ HR, right @ HR)  # E H R^T (R H R^T)^-1
        right = torch.linalg.lstsq(left, E64).solution  # (L^T L)^-1 L^T E
    return _balanced(left, right)


def solve(E: Tensor, H: Tensor, rank: int, solver: str, als_steps: int = 20, damp: float = DEFAULT_DAMP) -> LowRank:
    if solver == "exact":
        return solve_exact(E, H, rank, damp)
    if solver == "als":
        return solve_als(E, H, rank, als_steps)
    if solver == "svd":
        return svd_init(E, rank)
    raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")


def _balanced(left: Tensor, right: Tensor) -> LowRank:
    """Re-factor left @ right as U sqrt(S), sqrt(S) V^T so both LoRA factors share the scale."""
    Q_left, R_left = torch.linalg.qr(left)  # (out, r), (r, r)
    Q_right, R_right = torch.linalg.qr(right.T)  # (in, r), (r, r)
    u, s, vh = torch.linalg.svd(R_left @ R_right.T)
    root = s.sqrt()
    return LowRank((Q_left @ u) * root, root[:, None] * (vh @ Q_right.T))


def _damped_eigh(H: Tensor, in_features: int, damp: float) -> tuple[Tensor, Tensor, int]:
    """Eigenvalues (floored at damp * mean), eigenvectors (in, in), and how many were floored."""
    H64 = _checked_hessian(H, in_features)
    eigenvalues, V = torch.linalg.eigh(H64)
    mean = eigenvalues.mean()
    if not mean > 0:
        raise FloatingPointError("H is zero: the calibration data never reached this layer")
    floor = damp * mean
    return eigenvalues.clamp_min(floor), V, int((eigenvalues < floor).sum())


def _solve_right(B: Tensor, A: Tensor) -> Tensor:
    """X with X A = B for a symmetric positive semi-definite A (r, r), robust when singular."""
    return torch.linalg.lstsq(A, B.T).solution.T


def _checked(E: Tensor, rank: int) -> Tensor:
    if E.ndim != 2:
        raise ValueError(f"E must be a matrix, got shape {tuple(E.shape)}")
    if not 0 < rank <= min(E.shape):
        raise ValueError(f"rank {rank} must be between 1 and min{tuple(E.shape)} = {min(E.shape)}")
    if not torch.isfinite(E).all():
        raise FloatingPointError("the quantization error E has non-finite values: the source weights hold NaN or inf")
    return E.double()


def _checked_hessian(H: Tensor, in_features: int) -> Tensor:
    if H.shape != (in_features, in_features):
        raise ValueError(f"H must be ({in_features}, {in_features}), got {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise FloatingPointError("H has non-finite values: the calibration activations overflowed")
    return H.double()
