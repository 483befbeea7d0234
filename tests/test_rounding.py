"""Calibrated rounding (GPTQ codes on bitsandbytes' own scales) and joint refinement: properties of the math.

Every check of the stored bytes goes through bitsandbytes itself (QuantState.from_dict, dequantize_4bit,
int8_vectorwise_dequant), never through the converter's grid code.
"""
import bitsandbytes.functional as bnbF
import pytest
import torch

from quailora_convert.core.joint import quantize_and_solve
from quailora_convert.core.quantize import Int8Quantizer, NF4Quantizer, pack_nibbles, unpack_nibbles
from quailora_convert.core.rounding import gptq_codes, gptq_factor, nearest_codes
from quailora_convert.core.solvers import calibrated_error, factor_hessian, solve_exact, solve_factored


def correlated_problem(seed: int, out_features: int = 96, in_features: int = 256, tokens: int = 2048):
    """W (out, in) with bf16-exact values and H from inputs with correlated, unequal channels (like activations)."""
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(out_features, in_features, generator=g) * 0.05).bfloat16().float()
    mixing = torch.randn(in_features, in_features, generator=g) * 0.1 + torch.eye(in_features)
    channel_scale = torch.rand(in_features, generator=g) * 3 + 0.1
    X = (torch.randn(tokens, in_features, generator=g) @ mixing) * channel_scale  # (tokens, in)
    return W, X.T @ X / tokens


def stored_dequantized(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """What bitsandbytes computes with from the stored tensors alone."""
    if "SCB" in tensors:
        return bnbF.int8_vectorwise_dequant(tensors["weight"], tensors["SCB"])
    state = bnbF.QuantState.from_dict({k[len("weight."):]: v for k, v in tensors.items() if k != "weight"},
                                      device=torch.device("cpu"))
    return bnbF.dequantize_4bit(tensors["weight"], state).to(dtype)


@pytest.mark.parametrize("shape", [(64, 128), (96, 256), (3, 192), (7, 66)])
def test_repacking_bitsandbytes_codes_reproduces_its_bytes(shape):
    W = torch.randn(*shape)
    packed, _ = bnbF.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4",
                                   quant_storage=torch.uint8)
    codes = unpack_nibbles(packed, W.numel())
    assert torch.equal(pack_nibbles(codes.view(shape)), packed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nf4_grid_reproduces_bitsandbytes_dequantization_bit_for_bit(dtype):
    W, _ = correlated_problem(0)
    quantizer = NF4Quantizer()
    quantized = quantizer.quantize(W.to(dtype))
    codes = unpack_nibbles(quantized.tensors["weight"], W.numel()).view(W.shape)
    assert torch.equal(quantizer.grid(quantized).values(codes).to(dtype), quantized.dequantized)


def test_int8_grid_reproduces_bitsandbytes_dequantization_bit_for_bit():
    W, _ = correlated_problem(1)
    quantizer = Int8Quantizer()
    quantized = quantizer.quantize(W)
    codes = quantized.tensors["weight"].long() + 127
    assert torch.equal(quantizer.grid(quantized).values(codes), quantized.dequantized)


@pytest.mark.parametrize("quantizer, dtype", [(NF4Quantizer(), torch.bfloat16), (Int8Quantizer(), torch.float32)])
def test_stored_gptq_codes_are_exactly_the_q_the_solver_used(quantizer, dtype):
    W, H = correlated_problem(2)
    result = quantize_and_solve(W, dtype, H, quantizer, lambda E: solve_exact(E, H, 16), "gptq", refine=2)
    Q = stored_dequantized(result.quantized.tensors, dtype).float()
    assert torch.equal(W - Q, result.error)  # bit for bit: the correction was solved for this base
    nearest = quantizer.quantize(W.to(dtype))
    for key in nearest.tensors:
        if key != "weight":  # the statistics are bnb's own, only the codes differ
            assert torch.equal(nearest.tensors[key], result.quantized.tensors[key]), key
    assert not torch.equal(nearest.tensors["weight"], result.quantized.tensors["weight"])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("quantizer, dtype", [(NF4Quantizer(), torch.bfloat16), (Int8Quantizer(), torch.float32)])
def test_gptq_calibrated_error_is_below_round_to_nearest(seed, quantizer, dtype):
    W, H = correlated_problem(seed)
    nearest = quantizer.quantize(W.to(dtype))
    grid = quantizer.grid(nearest)
    gptq = quantizer.with_codes(nearest, gptq_codes(W, gptq_factor(H), grid))
    error_nearest = calibrated_error(W - nearest.dequantized.float(), H)
    error_gptq = calibrated_error(W - gptq.dequantized.float(), H)
    assert error_gptq < 0.8 * error_nearest
    in_order = quantizer.with_codes(nearest, gptq_codes(W, gptq_factor(H, act_order=False), grid))
    assert calibrated_error(W - in_order.dequantized.float(), H) < error_nearest


def test_gptq_on_isotropic_h_is_round_to_nearest():
    """With H = I no column's error can be cancelled by another: GPTQ reduces to nearest codes."""
    W, _ = correlated_problem(5)
    quantizer = NF4Quantizer()
    grid = quantizer.grid(quantizer.quantize(W))
    assert torch.equal(gptq_codes(W, gptq_factor(torch.eye(W.shape[1])), grid), nearest_codes(W, grid))


def test_gptq_tolerates_dead_inputs():
    W, H = correlated_problem(6)
    H[:, :10] = 0
    H[:10, :] = 0  # inputs that are always zero
    quantizer = NF4Quantizer()
    grid = quantizer.grid(quantizer.quantize(W))
    codes = gptq_codes(W, gptq_factor(H), grid)
    assert codes.min() >= 0 and codes.max() < 16
    assert torch.equal(codes[:, :10], nearest_codes(W[:, :10], grid.__class__(grid.levels, grid.scales[:, :10])))


@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_refinement_never_increases_the_objective_and_keeps_the_best(rounding):
    W, H = correlated_problem(7)
    quantizer = NF4Quantizer()
    solve_error = (lambda E: solve_exact(E, H, 8))
    plain = quantize_and_solve(W, torch.bfloat16, H, quantizer, solve_error, rounding, refine=0)
    refined = quantize_and_solve(W, torch.bfloat16, H, quantizer, solve_error, rounding, refine=4)
    assert len(refined.objective_rounds) == 5
    assert refined.objective_rounds[0] == plain.objective_rounds[0]
    kept = refined.objective_rounds[refined.kept_round]
    assert kept == min(refined.objective_rounds) <= plain.objective_rounds[0]
    assert kept < 0.95 * plain.objective_rounds[0]  # on this problem refinement does help
    stored = W - stored_dequantized(refined.quantized.tensors, torch.bfloat16).float()
    assert calibrated_error(stored.double() - refined.correction.matrix(), H) == pytest.approx(kept, rel=1e-12)


def test_nearest_without_refinement_is_bitsandbytes_own_quantization():
    W, H = correlated_problem(8)
    quantizer = NF4Quantizer()
    result = quantize_and_solve(W, torch.bfloat16, H, quantizer, lambda E: solve_exact(E, H, 8))
    plain = quantizer.quantize(W.bfloat16())
    assert result.quantized.tensors.keys() == plain.tensors.keys()
    assert all(torch.equal(plain.tensors[k], result.quantized.tensors[k]) for k in plain.tensors)
    assert result.error_nearest == result.error_rounded


def test_factored_solve_equals_solve_exact():
    W, H = correlated_problem(9)
    E = W - NF4Quantizer().quantize(W).dequantized
    direct, factored = solve_exact(E, H, 8), solve_factored(E, factor_hessian(H, E.shape[1]), 8)
    assert torch.equal(direct.left, factored.left) and torch.equal(direct.right, factored.right)


def test_a_shared_gptq_factor_gives_the_same_bundle_as_one_made_per_call():
    W, H = correlated_problem(11)
    quantizer = NF4Quantizer()
    solve_error = (lambda E: solve_exact(E, H, 8))
    own = quantize_and_solve(W, torch.bfloat16, H, quantizer, solve_error, "gptq", refine=2)
    shared = quantize_and_solve(W, torch.bfloat16, H, quantizer, solve_error, "gptq", refine=2, gptq=gptq_factor(H))
    assert all(torch.equal(own.quantized.tensors[k], shared.quantized.tensors[k]) for k in own.quantized.tensors)
    assert torch.equal(own.correction.left, shared.correction.left)


def _textbook_gptq(W, H, grid, damp=0.01, block=128):
    """GPTQ as first written here (one column at a time, the factor made per call): the reference."""
    from quailora_convert.core.rounding import _inverse_cholesky_upper, _nearest

    order = torch.argsort(torch.diagonal(H), descending=True)
    U = _inverse_cholesky_upper(H.double()[order][:, order], damp)
    work, scales = W.float()[:, order].clone(), grid.step()[:, order].float()
    codes = torch.empty(W.shape, dtype=torch.int64)
    for start in range(0, W.shape[1], block):
        stop = min(start + block, W.shape[1])
        errors = torch.empty(W.shape[0], stop - start)
        for j in range(start, stop):
            column = work[:, j]
            codes[:, j] = _nearest(column / scales[:, j], grid.levels)
            error = (column - grid.levels[codes[:, j]] * scales[:, j]) / U[j, j]
            work[:, j:stop].sub_(error[:, None] * U[j, j:stop][None, :])
            errors[:, j - start] = error
        work[:, stop:].sub_(errors @ U[start:stop, stop:])
    result = torch.empty_like(codes)
    result[:, order] = codes
    return result


@pytest.mark.parametrize("quantizer", [NF4Quantizer(), Int8Quantizer()])
def test_fast_gptq_loop_gives_the_textbook_codes_bit_for_bit(quantizer):
    W, H = correlated_problem(12, 96, 320, 600)
    grid = quantizer.grid(quantizer.quantize(W))
    assert torch.equal(gptq_codes(W, gptq_factor(H), grid), _textbook_gptq(W, H, grid))


def test_bad_rounding_arguments_raise():
    W, H = correlated_problem(10, 8, 64, 128)
    with pytest.raises(ValueError, match="rounding"):
        quantize_and_solve(W, torch.float32, H, NF4Quantizer(), lambda E: solve_exact(E, H, 2), "stochastic")
    with pytest.raises(ValueError, match="refinement"):
        quantize_and_solve(W, torch.float32, H, NF4Quantizer(), lambda E: solve_exact(E, H, 2), "gptq", refine=-1)
    with pytest.raises(ValueError, match="H must be"):
        gptq_codes(W, gptq_factor(H[:10, :10]), NF4Quantizer().grid(NF4Quantizer().quantize(W)))
