"""The exact solve at Llama shapes: time and objective of the current solver against the previous one.

For each out x in shape: W random (std 0.02), E = W - NF4(W) with bitsandbytes' own quantization, and a
synthetic H (in, in) shaped like real activation moments: per-channel scales spread over two decades
(log-normal, a few outlier channels) times a low-rank-plus-identity correlation,
    H = D (0.1 I + G G^T / k) D,  G (in, k) Gaussian, k = min(in, 1024).
Solvers:
- "cholesky + rsvd" (today): H + ridge I = L L^T (Cholesky), E L without L's zero upper triangle
  (core.solvers.times_lower), its top r by randomized subspace iteration (core.solvers.top_singular),
  M = [E L]_r L^-1 by a triangular solve;
- "eigh + svd" (before): eigendecomposition of H with eigenvalues floored at 1e-6 x their mean, full
  SVD of E L (the solver of commit 8405e27, copied below).
Timed separately: factoring H (shared by the modules of an input group: q/k/v, gate/up) and the solve
for one E. The objective is the calibrated error ||(E - M) L||^2 = tr((E - M) (H + ridge I) (E - M)^T)
relative to plain NF4's (M = 0), with today's ridge (1e-6 x the mean eigenvalue) for both solvers; today's
comes from the calibrated errors the solve returns (no more products). "vs previous" is today's objective
over the previous solver's minus 1 (the previous one is the exact minimiser up to its damping, so this is
the price of the randomized SVD). The previous solver is skipped where in > --old-max-in (an eigh of
28672 x 28672 in float64 takes hours on a 2-core CPU).

    python benchmarks/solve.py                                  # the four default shapes, CPU
    python benchmarks/solve.py --shapes 4096x4096 --device cuda --old-max-in 100000 --json /tmp/solve.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from quailora_convert.core.quantize import NF4Quantizer
from quailora_convert.core.solvers import factor_hessian, solve_factored

DEFAULT_SHAPES = "4096x4096,4096x11008,11008x4096,8192x28672"  # q_proj, up/gate, down of Llama-2-7B; 70B down_proj


def synthetic_problem(out_features: int, in_features: int, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    W = (0.02 * torch.randn(out_features, in_features, generator=g)).to(device)  # (out, in)
    E = W - NF4Quantizer().quantize(W).dequantized.float()  # (out, in)
    del W
    k = min(in_features, 1024)
    G = torch.randn(in_features, k, generator=g).to(device)  # (in, k)
    scales = torch.exp(torch.randn(in_features, generator=g)).to(device)  # (in,) log-normal: outlier channels
    H = torch.addmm(0.1 * torch.eye(in_features, device=device), G, G.T, alpha=1.0 / k)  # (in, in)
    H.mul_(scales[:, None]).mul_(scales[None, :])
    return E, H


def previous_solver(E: torch.Tensor, H: torch.Tensor, rank: int, damp: float = 1e-6):
    """The exact solver as of commit 8405e27: eigh with an eigenvalue floor, full SVD of E L."""
    eigenvalues, V = torch.linalg.eigh(H.double())
    root = eigenvalues.clamp_min(damp * eigenvalues.mean()).sqrt()
    U, S, Vh = torch.linalg.svd((E.double() @ V) * root, full_matrices=False)
    return (U[:, :rank] * S[:rank]) @ ((Vh[:rank] / root) @ V.T)  # (out, in) M


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


def damped_objective(E: torch.Tensor, M: torch.Tensor, L: torch.Tensor) -> float:
    """||(E - M) L||^2 = tr((E - M) (H + ridge I) (E - M)^T), in row blocks (no (out, in) float64 copy of E - M)."""
    total = 0.0
    for start in range(0, E.shape[0], 1024):
        rows = E[start:start + 1024].double()
        R = (rows - M[start:start + 1024]) @ L  # (rows, in)
        total += float((R * R).sum())
    return total


def _damped_from_solve(E: torch.Tensor, low_rank, shift: float) -> tuple[float, float]:
    """||E L||^2 and ||(E - M) L||^2 from the calibrated errors the solve returns (tr(D H D^T) = ||D L||^2 -
    shift ||D||^2) instead of two more (out, in) x (in, in) products: at 8192 x 28672 each is ~1.3e13 flops."""
    error_E, error_after = low_rank.calibrated
    residual_squared = 0.0
    for start in range(0, E.shape[0], 1024):
        rows = E[start:start + 1024].double() - low_rank.left[start:start + 1024] @ low_rank.right
        residual_squared += float((rows * rows).sum())
    return error_E + shift * float((E.double() ** 2).sum()), error_after + shift * residual_squared


def run_shape(out_features: int, in_features: int, rank: int, device: torch.device, old_max_in: int) -> dict:
    E, H = synthetic_problem(out_features, in_features, device)
    run_previous = in_features <= old_max_in
    factor, factor_seconds = timed(lambda: factor_hessian(H, in_features), device)
    if not run_previous:
        del H  # the largest shape: keep one (in, in) float64 buffer, not three
    low_rank, solve_seconds = timed(lambda: solve_factored(E, factor, rank), device)
    plain, today = _damped_from_solve(E, low_rank, factor.shift)
    today /= plain
    row = {"shape": f"{out_features}x{in_features}", "rank": rank, "device": str(device),
           "factor_seconds": factor_seconds, "solve_seconds": solve_seconds, "relative_error": today}
    if run_previous:
        M, old_seconds = timed(lambda: previous_solver(E, H, rank), device)
        before = damped_objective(E, M, factor.L) / plain
        row.update(previous_seconds=old_seconds, previous_relative_error=before, vs_previous=today / before - 1)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated OUTxIN")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--old-max-in", type=int, default=11008, help="skip the previous solver above this in_features")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    device = torch.device(args.device)
    rows = []
    print("| shape (out x in) | factor H s | solve s | previous s (eigh + svd) | speed-up | relative error | vs previous |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for shape in args.shapes.split(","):
        out_features, in_features = (int(v) for v in shape.lower().split("x"))
        row = run_shape(out_features, in_features, args.rank, device, args.old_max_in)
        rows.append(row)
        today = row["factor_seconds"] + row["solve_seconds"]
        previous = row.get("previous_seconds")
        print(f"| {row['shape']} | {row['factor_seconds']:.2f} | {row['solve_seconds']:.2f} | "
              + (f"{previous:.2f} | {previous / today:.1f}x" if previous is not None else "not run | ")
              + f" | {row['relative_error']:.5f} | "
              + (f"{row['vs_previous']:+.1e}" if previous is not None else "") + " |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
