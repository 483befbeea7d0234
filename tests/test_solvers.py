"""Properties of the low-rank solvers: the math, not golden numbers."""
import math

import pytest
import torch

from quailora_convert.core.lora import lora_scaling, to_peft
from quailora_convert.core.solvers import calibrated_error, solve, solve_als, solve_exact, svd_init


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
    for solver in ("exact", "als"):
        M = solve(E, H, 6, solver).matrix()
        assert torch.allclose(M, svd_init(E, 6).matrix(), atol=1e-9)


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
    assert result.damped >= 64 - 20
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
