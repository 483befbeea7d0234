"""PEFT's LoRA convention: adapter tensor names, target_modules, scaling and the two factors.

PEFT computes W x + scaling * lora_B (lora_A x) with lora_A (r, in), lora_B (out, r) and
scaling = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)). A correction M is therefore stored as
factors whose product is M / scaling.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .options import LORA_SPLITS
from .solvers import LowRank, svd_of_product

# The norm of each row of PEFT's default lora_A: kaiming_uniform_(a=sqrt(5)) draws U(-1/sqrt(in), 1/sqrt(in)),
# variance 1/(3 in), so a row of in entries has squared norm 1/3 on average, whatever in is
KAIMING_ROW_NORM = 1 / math.sqrt(3)


def adapter_key(module_path: str, factor: str) -> str:
    """Name of lora_A / lora_B for a module, as PEFT saves a CausalLM adapter."""
    return f"base_model.model.{module_path}.{factor}.weight"


def peft_target_modules(targeted: set[str], all_linears: set[str]) -> list[str]:
    """The shortest target_modules list that matches exactly the targeted module paths.

    Leaf names (q_proj, ...) when they pick out nothing more; otherwise the full paths.
    """
    leaves = sorted({path.rsplit(".", 1)[-1] for path in targeted})
    matched = {p for p in all_linears if p.rsplit(".", 1)[-1] in leaves}
    return leaves if matched == targeted else sorted(targeted)


def lora_scaling(lora_alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's multiplier on lora_B @ lora_A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return lora_alpha / (math.sqrt(rank) if use_rslora else rank)


def to_peft(low_rank: LowRank, scaling: float, split: str = "balanced") -> tuple[Tensor, Tensor]:
    """(lora_A (r, in), lora_B (out, r)) in float32 with scaling * lora_B @ lora_A == M, split as asked.

    With M = U S V^T (the SVD of low_rank's product):
    - balanced: lora_B = U sqrt(S) / sqrt(scaling), lora_A = sqrt(S) V^T / sqrt(scaling) (both factors
      share the scale; the scaling is divided out evenly, so PEFT's forward, which multiplies by it,
      reproduces M exactly: PEFT's own LoftQ init omits this, peft#1982);
    - a-kaiming: lora_A = V^T * KAIMING_ROW_NORM, each row the norm PEFT's Kaiming-uniform lora_A has
      (orthogonal rows, as PEFT's nearly are for in >> r), lora_B = U S / (KAIMING_ROW_NORM * scaling):
      under Adam the factors then take steps of the size plain LoRA's take near step 0;
    - u: lora_A = V^T (orthonormal rows), lora_B = U S / scaling.
    """
    if not scaling > 0:
        raise ValueError(f"LoRA scaling must be positive, got {scaling}")
    if split == "balanced":  # low_rank's factors are U sqrt(S), sqrt(S) V^T already (solvers._balanced)
        root = math.sqrt(scaling)
        return (low_rank.right / root).float().contiguous(), (low_rank.left / root).float().contiguous()
    row_norm = {"a-kaiming": KAIMING_ROW_NORM, "u": 1.0}.get(split)
    if row_norm is None:
        raise ValueError(f"unknown LoRA split {split!r}; choose one of {', '.join(LORA_SPLITS)}")
    U, S, Vh = svd_of_product(low_rank.left.double(), low_rank.right.double())
    lora_A = (Vh * row_norm).float().contiguous()  # (r, in)
    lora_B = (U * (S / (row_norm * scaling))).float().contiguous()  # (out, r)
    return lora_A, lora_B


def rank_patterns(shapes: dict[str, tuple[int, int]], rank: int, lora_alpha: float,
                  use_rslora: bool = False) -> tuple[dict[str, int], dict[str, float]]:
    """PEFT's rank_pattern and alpha_pattern for targeted modules too small for rank.

    shapes: (out, in) of every targeted module by path. A module with min(out, in) < rank gets
    that rank, and an alpha that keeps the scaling every other module has (the one the solver's
    factors were divided by): alpha * r'/r, or alpha * sqrt(r'/r) with rsLoRA. Keys are leaf names
    (k_proj) where every module of that name gets the same rank, else full paths.
    """
    clipped = {path: min(shape) for path, shape in shapes.items() if min(shape) < rank}
    by_leaf: dict[str, list[str]] = {}
    for path in shapes:
        by_leaf.setdefault(path.rsplit(".", 1)[-1], []).append(path)
    ranks: dict[str, int] = {}
    for leaf, paths in sorted(by_leaf.items()):
        found = {clipped.get(p) for p in paths}
        if len(found) == 1 and None not in found:
            ranks[leaf] = found.pop()
        else:
            ranks.update({p: clipped[p] for p in sorted(paths) if p in clipped})
    factor = (lambda r: math.sqrt(r / rank)) if use_rslora else (lambda r: r / rank)
    return ranks, {key: lora_alpha * factor(r) for key, r in ranks.items()}


def difference_factors(lora_A: Tensor, lora_B: Tensor, init_A: Tensor, init_B: Tensor) -> tuple[Tensor, Tensor]:
    """(A (r + r0, in), B (out, r + r0)) with B @ A == lora_B @ lora_A - init_B @ init_A, exactly.

    What PEFT's LoraModel.subtract_mutated_init stores for a PiSSA/OLoRA/CorDA adapter converted to plain
    LoRA: [A; A0] and [B, -B0], concatenated along the rank, so no product is ever formed.
    """
    if lora_A.shape[1] != init_A.shape[1] or lora_B.shape[0] != init_B.shape[0]:
        raise ValueError(f"factors of different modules: lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}, "
                         f"init_A {tuple(init_A.shape)}, init_B {tuple(init_B.shape)}")
    dtype = torch.promote_types(lora_A.dtype, init_A.dtype)
    A = torch.cat([lora_A.to(dtype), init_A.to(dtype)], dim=0).contiguous()
    B = torch.cat([lora_B.to(dtype), -init_B.to(dtype)], dim=1).contiguous()
    return A, B


def alpha_for_doubled_rank(lora_alpha: float, use_rslora: bool = False) -> float:
    """The lora_alpha that keeps a module's scaling when difference_factors doubles its rank (r0 == r).

    alpha * 2, or alpha * sqrt(2) under rsLoRA (scaling alpha / sqrt(r)): what PEFT's save_pretrained does to
    lora_alpha when it converts a PiSSA/OLoRA/CorDA adapter. Every alpha_pattern entry takes the same factor (PEFT
    doubles those even under rsLoRA, which is why it refuses rsLoRA with a rank or alpha pattern).
    """
    return lora_alpha * (math.sqrt(2.0) if use_rslora else 2.0)
