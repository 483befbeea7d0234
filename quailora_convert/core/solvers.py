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

RIDGE_RETRIES = 8  # tenfold increases of the Cholesky ridge before giving up
# Randomized SVD: quantization error has a flat spectrum, so it keeps as many extra directions as the rank
# (2r in all); measured on SmolLM2's E L, 4 power iterations then leave the rank-64 residual within 1e-5 of
# the optimum. Below min(m, n) = 8 x 2r the full SVD costs no more (0.05-0.16 s at 576 x 1536 on 2 cores).
RSVD_MIN_RATIO = 8
RSVD_MAX_POWER = 8  # power iterations before falling back to the full SVD
RSVD_TOLERANCE = 1e-4  # stop when one iteration improves the rank-r residual by less than this, relatively
# _full_svd keeps its float32 search only where float32 resolves it: the r-th direction's share of the Gram matrix
# (S[r-1]^2 / S[0]^2) and the part the top r leave unexplained (of ||A||^2) both at least this, far above float32's
# rounding (6e-8 of the largest eigenvalue); else the directions are searched again in float64
FLOAT32_MIN_SHARE = 1e-4
LOWER_PRODUCT_BLOCK = 512  # columns per product in times_lower: about half the flops of a full product


@dataclass(frozen=True)
class LowRank:
    """A rank-r matrix M = left @ right, both factors float64 with balanced singular values."""

    left: Tensor  # (out, r)
    right: Tensor  # (r, in)
    ridge: float = 0.0  # added to H's diagonal before the solve (relative to its mean diagonal)
    # (tr(E H E^T), tr((E - M) H (E - M)^T)) of the E it was solved for, when the solve had them for free
    calibrated: tuple[float, float] | None = None

    def matrix(self) -> Tensor:
        return self.left @ self.right  # (out, in)


def calibrated_error(E: Tensor, H: Tensor) -> float:
    """tr(E H E^T) in float64: the mean squared output error ||E X||^2 / n."""
    E64, H64 = E.double(), H.double()
    return float(((E64 @ H64) * E64).sum())


def svd_init(E: Tensor, rank: int, max_power: int = RSVD_MAX_POWER, fallback: bool = True) -> LowRank:
    """Best rank-r approximation of E in the weight space (Frobenius norm): LoftQ-style. With fallback
    False and a small max_power, a cheap approximation of it for large matrices (the report's baseline)."""
    E64 = _checked(E, rank)
    U, S, Vh = top_singular(E64, rank, max_power=max_power, fallback=fallback)
    return _balanced(U * S, Vh)


@dataclass(frozen=True)
class HessianFactor:
    """H + ridge * mean(diag H) * I = L L^T, the Cholesky factor every exact solve against one H shares."""

    L: Tensor  # (in, in) lower triangular, float64
    ridge: float  # relative to H's mean diagonal (its mean eigenvalue): damp, or more if H needed it
    shift: float  # the ridge in H's units: L L^T = H + shift * I


def factor_hessian(H: Tensor, in_features: int, damp: float = DEFAULT_DAMP) -> HessianFactor:
    """Cholesky of H with damp * mean eigenvalue on the diagonal; the ridge grows tenfold (at most
    RIDGE_RETRIES times) while float32 rounding leaves H numerically indefinite."""
    _check_hessian(H, in_features)
    mean = torch.diagonal(H).double().mean()  # = the mean eigenvalue
    if not mean > 0:
        raise FloatingPointError("H is zero: the calibration data never reached this layer")
    ridge = damp
    info = torch.zeros((), dtype=torch.int32, device=H.device)
    for _ in range(RIDGE_RETRIES + 1):
        L = H.to(torch.float64, copy=True)  # factored in place: one (in, in) float64 buffer
        L.diagonal().add_(ridge * mean)
        # H is symmetric, so L's row-major buffer read column-major (L.mT) is H too, and LAPACK factors that view
        # without a transposed copy: its upper factor U = L^T lands in L's lower triangle (2x faster at 1536)
        upper = L.mT
        torch.linalg.cholesky_ex(upper, upper=True, out=(upper, info))
        if int(info) == 0:
            return HessianFactor(L, ridge, float(ridge * mean))
        ridge *= 10
    raise FloatingPointError(f"H is not positive definite even with {ridge / 10:g} x its mean eigenvalue added")


def solve_exact(E: Tensor, H: Tensor, rank: int, damp: float = DEFAULT_DAMP) -> LowRank:
    """The closed-form minimiser of tr((E - M) H (E - M)^T) over rank-r M.

    With the damped Cholesky factorisation H = L L^T, M = [E L]_r L^-1: the rank-r truncation of
    E L (top_singular) mapped back through a triangular solve.
    """
    E64 = _checked(E, rank)
    return solve_factored(E64, factor_hessian(H, E64.shape[1], damp), rank)


def solve_factored(E: Tensor, factor: HessianFactor, rank: int) -> LowRank:
    """solve_exact with H already factored (factor_hessian): one factor serves every E of an input group.

    The calibrated errors of E and of E - M come with it (LowRank.calibrated) without another
    (out, in) x (in, in) product: tr(D H D^T) = ||D L||^2 - shift ||D||^2, where E L = G is at hand and
    (E - M) L = G - P G for the projection P onto the top singular directions, so ||(E - M) L||^2 =
    ||G||^2 - sum of the kept singular values squared.
    """
    E64 = _checked(E, rank)
    G = times_lower(E64, factor.L)  # (out, in) E L
    U, S, Vh = top_singular(G, rank)
    right = torch.linalg.solve_triangular(factor.L.T, Vh.T, upper=True).T  # Vh L^-1 (r, in)
    low_rank = _balanced(U * S, right)
    G_squared = float((G * G).sum())
    residual = E64 - low_rank.matrix()  # (out, in)
    calibrated = (G_squared - factor.shift * float((E64 * E64).sum()),
                  G_squared - float((S * S).sum()) - factor.shift * float((residual * residual).sum()))
    return LowRank(low_rank.left, low_rank.right, factor.ridge, calibrated)


def times_lower(A: Tensor, L: Tensor, block: int = LOWER_PRODUCT_BLOCK) -> Tensor:
    """A @ L for a lower-triangular L (n, n), skipping L's zero upper triangle: column block j of the product
    needs only L's rows from j on. 0.72x (0.64x) the time of A @ L at 4096 x 4096 (4096 x 11008) in float64
    on 2 cores (equal to 1e-15 relative: only the order of the sums changes)."""
    n = L.shape[0]
    if n <= block:
        return A @ L
    product = torch.empty(A.shape[0], n, dtype=torch.result_type(A, L), device=A.device)  # (m, n)
    for start in range(0, n, block):
        stop = min(start + block, n)
        product[:, start:stop] = A[:, start:] @ L[start:, start:stop]
    return product


def top_singular(A: Tensor, rank: int, seed: int = 0, max_power: int = RSVD_MAX_POWER,
                 fallback: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """U (m, r), S (r,), Vh (r, n) of the best rank-r approximation of A (m, n), in A's dtype.

    Randomized subspace iteration (Halko, Martinsson, Tropp 2011) on 2r directions: after each power
    iteration the rank-r residual ||A - A_r||^2 is recomputed, and the iteration stops when it improves
    by less than RSVD_TOLERANCE of itself. A small matrix, or (with fallback) one that has not converged
    after max_power iterations, gets the full SVD instead. Deterministic for a seed.
    """
    m, n = A.shape
    k = 2 * rank
    if RSVD_MIN_RATIO * k > min(m, n):
        return _full_svd(A, rank)
    generator = torch.Generator(device=A.device).manual_seed(seed)
    start = torch.randn(n, k, generator=generator, dtype=torch.float64, device=A.device)  # one draw for every dtype
    Q = torch.linalg.qr(A @ start.to(A.dtype)).Q  # (m, k)
    total = float((A * A).sum())
    previous = None
    for iteration in range(max_power + 1):
        B = Q.T @ A  # (k, n)
        Ub, Sb, Vhb = torch.linalg.svd(B, full_matrices=False)
        residual = total - float((Sb[:rank] ** 2).sum())
        if previous is not None and previous - residual <= RSVD_TOLERANCE * max(residual, 1e-12 * total):
            return Q @ Ub[:, :rank], Sb[:rank], Vhb[:rank]
        previous = residual
        if iteration == max_power:
            break
        Q = torch.linalg.qr(A @ torch.linalg.qr(B.T).Q).Q  # one power iteration: range of A A^T Q
    return _full_svd(A, rank) if fallback else (Q @ Ub[:, :rank], Sb[:rank], Vhb[:rank])


def _full_svd(A: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top-r triplets of A from the eigendecomposition of its smaller Gram matrix (at 576 x 1536 in float64
    on 2 cores 0.038 s against 0.169 s for the SVD).

    The directions are found in float32 (the Gram product and eigh in half the time of float64's), then made
    exact in A's precision for the subspace they span (Rayleigh-Ritz: an orthonormal basis V of it, the
    eigendecomposition of (B V)^T (B V)), so ||A - U S V^T||^2 = ||A||^2 - sum S^2 holds to A's precision;
    the subspace's float32 error enters the residual squared (the tests hold it to 1e-9 of the optimum).
    Where float32 cannot resolve them (FLOAT32_MIN_SHARE: a direction among the top r, or the residual, below
    its rounding) they are found again in float64. Only U S is exact where singular values vanish (U's
    columns there are zero), which is all callers use."""
    tall = A.shape[0] >= A.shape[1]
    B = A if tall else A.T  # (long side, short side)
    if A.dtype != torch.float64:
        return _gram_top(B, rank, tall, B.dtype, A)[0]
    found, total = _gram_top(B, rank, tall, torch.float32, A)
    S = found[1]
    resolved = float(S[-1]) ** 2 >= FLOAT32_MIN_SHARE * float(S[0]) ** 2
    if resolved and total - float((S * S).sum()) >= FLOAT32_MIN_SHARE * total:
        return found
    return _gram_top(B, rank, tall, torch.float64, A)[0]


def _gram_top(B: Tensor, rank: int, tall: bool, search_dtype: torch.dtype,
              A: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], float]:
    """_full_svd with the directions searched in search_dtype; also ||B||^2 as the Gram matrix's trace."""
    if search_dtype == B.dtype:
        scale, searched = 1.0, B
    else:  # scaled to a largest |value| of 1 as it is cast: nothing under- or overflows in the Gram product
        scale = float(torch.linalg.vector_norm(B, float("inf"))) or 1.0
        searched = torch.empty(B.shape, dtype=search_dtype, device=B.device)
        torch.mul(B, 1 / scale, out=searched)
    gram = searched.T @ searched  # (short, short)
    total = float(gram.diagonal().sum(dtype=torch.float64)) * scale * scale
    try:
        _, V = torch.linalg.eigh(gram)  # ascending
    except torch.linalg.LinAlgError:  # eigh did not converge: the SVD's own algorithm
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        return (U[:, :rank], S[:rank], Vh[:rank]), total
    del gram, searched
    V = V[:, -rank:].to(B.dtype)  # (short, r) the top r directions
    if search_dtype != B.dtype:
        V = torch.linalg.qr(V).Q  # orthonormal in B's precision
    C = B @ V  # (long, r)
    eigenvalues, W = torch.linalg.eigh(C.T @ C)  # (r, r) ascending: B's singular values on that subspace
    W = W.flip(1)
    S = eigenvalues.flip(0).clamp_min(0).sqrt()  # (r,)
    U = (C @ W) / torch.where(S > 0, S, torch.ones_like(S))  # (long, r)
    V = V @ W  # (short, r)
    return ((U, S, V.T) if tall else (V, S, U.T)), total


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


def svd_of_product(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """U (out, r), S (r,), Vh (r, in) of left @ right without forming it: QR of each factor, SVD of an r x r."""
    Q_left, R_left = torch.linalg.qr(left)  # (out, r), (r, r)
    Q_right, R_right = torch.linalg.qr(right.T)  # (in, r), (r, r)
    u, S, vh = torch.linalg.svd(R_left @ R_right.T)
    return Q_left @ u, S, vh @ Q_right.T


def _balanced(left: Tensor, right: Tensor) -> LowRank:
    """Re-factor left @ right as U sqrt(S), sqrt(S) V^T so both LoRA factors share the scale."""
    U, S, Vh = svd_of_product(left, right)
    root = S.sqrt()
    return LowRank(U * root, root[:, None] * Vh)


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
    _check_hessian(H, in_features)
    return H.double()


def _check_hessian(H: Tensor, in_features: int) -> None:
    if H.shape != (in_features, in_features):
        raise ValueError(f"H must be ({in_features}, {in_features}), got {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise FloatingPointError("H has non-finite values: the calibration activations overflowed")
