"""Properties of the low-rank solvers: the math, not golden numbers."""
import math

import pytest
import torch

from quailora_convert.core.lora import lora_scaling, to_peft
from quailora_convert.core.solvers import (
    calibrated_error, factor_hessian, solve, solve_als, solve_exact, solve_factored, svd_init, times_lower, top_singular)


def _problem(out=48, inp=96, tokens=400, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(out, inp, generator=g, dtype=torch.float64)
    scales = torch.logspace(-spread / 2, spread / 2, inp, dtype=torch.float64)  # anisotropic inputs
    X = torch.randn(inp, tokens, generator=g, dtype=torch.float64) * scales[:, None]
    return E, X @ X.T / tokens


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("rank", [1, 8, 24])
def test_objective_ordering_exact_als_svd_none(seed, rank):
    E, H = _problem(seed=seed)
    none = calibrated_error(E, H)
    svd = calibrated_error(E - svd_init(E, rank).matrix(), H)
    als = calibrated_error(E - solve_als(E, H, rank, steps=20).matrix(), H)
    exact = calibrated_error(E - solve_exact(E, H, rank).matrix(), H)
    assert exact <= als * (1 + 1e-4)
    assert als <= svd * (1 + 1e-12)
    assert svd < none
    assert exact < 0.95 * svd  # activation-aware init is a real gain on anisotropic inputs


def test_als_objective_never_increases():
    E, H = _problem(seed=5)
    errors = [calibrated_error(E - solve_als(E, H, 8, steps=k).matrix(), H) for k in range(8)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(errors, errors[1:]))
    assert errors[-1] < errors[0]


def test_isotropic_h_reduces_to_plain_svd():
    E, _ = _problem(seed=1)
    H = 3.7 * torch.eye(E.shape[1], dtype=torch.float64)
    best = _full_rank_r_residual(E, 6)  # the truncated SVD's ||E - M||^2
    for solver in ("exact", "als", "svd"):
        M = solve(E, H, 6, solver).matrix()
        assert float(((E - M) ** 2).sum()) == pytest.approx(best, rel=1e-9), solver


def test_exact_rank_r_error_is_recovered():
    g = torch.Generator().manual_seed(2)
    E = torch.randn(40, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 80, generator=g, dtype=torch.float64)
    _, H = _problem(out=40, inp=80, seed=3)
    for solver in ("exact", "als"):
        M = solve(E, H, 5, solver).matrix()
        assert torch.allclose(M, E, atol=1e-6), solver
        assert calibrated_error(E - M, H) < 1e-10 * calibrated_error(E, H)


def test_singular_h_is_damped_and_finite():
    E, _ = _problem(out=32, inp=64)
    X = torch.randn(64, 20, dtype=torch.float64)  # 20 tokens < 64 inputs: rank-20 H
    H = X @ X.T / 20
    result = solve_exact(E, H, 8)
    assert torch.isfinite(result.left).all() and torch.isfinite(result.right).all()
    assert result.ridge >= 1e-6
    assert calibrated_error(E - result.matrix(), H) <= calibrated_error(E - svd_init(E, 8).matrix(), H)


def test_exact_matches_als_fixed_point_on_well_conditioned_h():
    E, H = _problem(seed=7, spread=1.0)
    exact = calibrated_error(E - solve_exact(E, H, 4).matrix(), H)
    als = calibrated_error(E - solve_als(E, H, 4, steps=200).matrix(), H)
    assert math.isclose(exact, als, rel_tol=1e-6)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_factors_reproduce_m_with_scaling(use_rslora):
    E, H = _problem(seed=4)
    low_rank = solve_exact(E, H, 16)
    scaling = lora_scaling(16, 16, use_rslora)
    assert scaling == (16 / 4 if use_rslora else 1.0)
    lora_A, lora_B = to_peft(low_rank, scaling)
    assert lora_A.shape == (16, E.shape[1]) and lora_B.shape == (E.shape[0], 16)
    assert lora_A.dtype == lora_B.dtype == torch.float32
    rebuilt = scaling * lora_B.double() @ lora_A.double()
    assert torch.allclose(rebuilt, low_rank.matrix(), atol=1e-5 * low_rank.matrix().abs().max())


def test_factors_are_balanced():
    E, H = _problem(seed=6)
    low_rank = solve_als(E, H, 8)
    assert torch.allclose(low_rank.left.norm(dim=0), low_rank.right.norm(dim=1), rtol=1e-8)


def test_bad_inputs_raise_clear_errors():
    E, H = _problem()
    with pytest.raises(ValueError, match="rank"):
        solve_exact(E, H, 0)
    with pytest.raises(ValueError, match="rank"):
        svd_init(E, 1000)
    bad = E.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        solve_exact(bad, H, 4)
    bad_H = H.clone()
    bad_H[1, 1] = float("inf")
    with pytest.raises(FloatingPointError, match="non-finite"):
        solve_als(E, bad_H, 4)
    with pytest.raises(FloatingPointError, match="zero"):
        solve_exact(E, torch.zeros_like(H), 4)
    with pytest.raises(ValueError, match="unknown solver"):
        solve(E, H, 4, "magic")


def _full_rank_r_residual(A, rank):
    S = torch.linalg.svdvals(A)
    return float((S[rank:] ** 2).sum())


@pytest.mark.parametrize("shape", [(600, 700), (1100, 560)])
@pytest.mark.parametrize("spread", [0.0, 3.0])
def test_randomized_top_singular_is_within_1e_3_of_the_full_svd(shape, spread):
    g = torch.Generator().manual_seed(11)
    A = torch.randn(*shape, generator=g, dtype=torch.float64)
    A *= torch.logspace(-spread / 2, spread / 2, shape[1], dtype=torch.float64)  # flat (0) or decaying spectrum
    U, S, Vh = top_singular(A, 32)
    assert U.shape == (shape[0], 32) and S.shape == (32,) and Vh.shape == (32, shape[1])
    residual = float(((A - (U * S) @ Vh) ** 2).sum())
    best = _full_rank_r_residual(A, 32)
    assert best * (1 - 1e-12) <= residual <= best * (1 + 1e-3)
    assert torch.allclose(U.T @ U, torch.eye(32, dtype=torch.float64), atol=1e-10)


def test_randomized_top_singular_is_deterministic_and_small_matrices_get_the_full_svd():
    A = torch.randn(500, 600, dtype=torch.float64)
    first, second = top_singular(A, 16), top_singular(A, 16)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    small = torch.randn(60, 80, dtype=torch.float64)
    U, S, Vh = top_singular(small, 16)  # 8 * 2 * 16 > 60: the full SVD, exactly
    assert torch.allclose(S, torch.linalg.svdvals(small)[:16], rtol=1e-12)


def test_exact_solve_with_randomized_svd_matches_the_full_minimiser():
    E, H = _problem(out=640, inp=768, tokens=2000, seed=12)
    factor = factor_hessian(H, 768)
    M = solve_factored(E, factor, 24).matrix()
    best = _full_rank_r_residual(E @ factor.L, 24)  # the minimum of ||(E - M) L||^2
    achieved = float((((E - M) @ factor.L) ** 2).sum())
    assert best <= achieved * (1 + 1e-9) and achieved <= best * (1 + 1e-3)
    assert calibrated_error(E - M, H) < calibrated_error(E - svd_init(E, 24).matrix(), H)


def test_cholesky_ridge_grows_when_h_is_numerically_indefinite():
    E, H = _problem(out=32, inp=64)
    H = H.clone()
    H[0, 0] -= 2 * float(torch.linalg.eigvalsh(H)[0]) + 1e-3 * float(torch.diagonal(H).mean())  # one negative eigenvalue
    factor = factor_hessian(H, 64)
    assert factor.ridge > 1e-6
    rebuilt = factor.L @ factor.L.T
    ridge = factor.ridge * float(torch.diagonal(H).mean())
    assert torch.allclose(rebuilt, H + ridge * torch.eye(64, dtype=torch.float64), atol=1e-9)


def test_cheap_weight_space_baseline_is_a_projection_that_never_hurts():
    E, H = _problem(out=640, inp=800, seed=13)
    cheap = svd_init(E, 16, max_power=1, fallback=False).matrix()
    best = _full_rank_r_residual(E, 16)
    residual = float(((E - cheap) ** 2).sum())
    assert best * (1 - 1e-12) <= residual <= best * 1.1
    assert calibrated_error(E - cheap, H) <= calibrated_error(E, H)


@pytest.mark.parametrize("shape", [(48, 96), (96, 48), (600, 300)])
def test_the_exact_solve_reports_the_calibrated_errors_it_got_for_free(shape):
    """solve_factored's (tr(E H E^T), tr((E - M) H (E - M)^T)) from E L equal the direct products, also
    with a grown ridge and on the randomized path (600 x 300 at rank 16)."""
    E, H = _problem(*shape, tokens=500, seed=3)
    for damp in (0.01, 1.0):
        factor = factor_hessian(H, shape[1], damp)
        M = solve_factored(E, factor, 16)
        before, after = M.calibrated
        assert before == pytest.approx(calibrated_error(E, H), rel=1e-9)
        assert after == pytest.approx(calibrated_error(E - M.matrix(), H), rel=1e-9)
        assert 0 < after < before


def test_small_matrices_top_r_from_the_gram_matrix_match_the_svd():
    g = torch.Generator().manual_seed(0)
    for shape in ((300, 120), (120, 300)):
        A = torch.randn(*shape, generator=g, dtype=torch.float64)
        U, S, Vh = top_singular(A, 16)  # directions found in float32, made exact for their span in float64
        S_full = torch.linalg.svdvals(A)
        assert torch.allclose(S, S_full[:16], rtol=1e-12)
        residual = float(((A - (U * S) @ Vh) ** 2).sum())
        assert residual == pytest.approx(float((S_full[16:] ** 2).sum()), rel=1e-9)  # the optimum
        assert residual == pytest.approx(float((A * A).sum() - (S * S).sum()), rel=1e-12)  # what the solve reports
        assert torch.allclose(U.T @ U, torch.eye(16, dtype=torch.float64), atol=1e-10)
        assert torch.allclose(Vh @ Vh.T, torch.eye(16, dtype=torch.float64), atol=1e-10)


def test_directions_that_leave_almost_nothing_are_found_in_float64():
    """A matrix within 1e-8 of rank r: float32 cannot resolve the tiny residual, so the search is redone in
    float64 and the top r come out as the full SVD's."""
    g = torch.Generator().manual_seed(5)
    A = torch.randn(200, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 150, generator=g, dtype=torch.float64)
    A += 1e-8 * torch.randn(200, 150, generator=g, dtype=torch.float64)
    U, S, Vh = top_singular(A, 8)
    U_full, S_full, Vh_full = torch.linalg.svd(A, full_matrices=False)
    assert torch.allclose((U * S) @ Vh, (U_full[:, :8] * S_full[:8]) @ Vh_full[:8], atol=1e-10)
    residual = float(((A - (U * S) @ Vh) ** 2).sum())
    assert residual == pytest.approx(float((S_full[8:] ** 2).sum()), rel=1e-6)


def test_directions_below_float32_rounding_are_found_in_float64():
    """One dominant direction and a long tail 1e-7 of its size: the tail leaves plenty unexplained, but float32
    cannot tell the tail's directions apart (they are under its rounding of the Gram matrix), so directions 2..r
    are searched in float64 and the residual is the optimum's (float32 alone left it ~1% above)."""
    g = torch.Generator().manual_seed(7)
    m, n, rank = 1200, 1100, 16
    U = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64)).Q  # (m, n)
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q  # (n, n)
    S = (1e-7 * (0.25 + 2 * torch.rand(n, generator=g, dtype=torch.float64))).sqrt()
    S[0] = 1.0
    S = S.sort(descending=True).values
    A = (U * S) @ V.T
    U_r, S_r, Vh_r = top_singular(A, rank)
    residual = float(((A - (U_r * S_r) @ Vh_r) ** 2).sum())
    optimum = float((S[rank:] ** 2).sum())
    assert optimum > 1e-4 * float((S * S).sum())  # the tail alone would have passed a residual test
    assert residual == pytest.approx(optimum, rel=1e-9)


def test_the_reports_baseline_error_equals_the_direct_product():
    from quailora_convert.convert.report import BASELINE_POWER, _baseline_error

    for shape in ((640, 800), (48, 96)):  # the randomized path, the exact one
        E, H = _problem(*shape, seed=21)
        direct = calibrated_error(E - svd_init(E, 16, BASELINE_POWER, False).matrix(), H)  # float64 throughout
        assert _baseline_error(E, 16, H, calibrated_error(E, H)) == pytest.approx(direct, rel=1e-5)


@pytest.mark.parametrize("n,block", [(7, 16), (64, 16), (70, 16), (300, 128)])
def test_the_product_with_a_lower_triangle_skips_only_zeros(n, block):
    g = torch.Generator().manual_seed(n)
    A = torch.randn(33, n, generator=g, dtype=torch.float64)
    L = torch.tril(torch.randn(n, n, generator=g, dtype=torch.float64))
    product = times_lower(A, L, block)
    assert product.shape == (33, n) and product.dtype == torch.float64
    assert torch.allclose(product, A @ L, rtol=0, atol=1e-12 * float((A @ L).abs().max()))
