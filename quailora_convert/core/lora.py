"""PEFT's LoRA convention: adapter tensor names, target_modules, scaling and the two factors.

PEFT computes W x + scaling * lora_B (lora_A x) with lora_A (r, in), lora_B (out, r) and
scaling = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)). A correction M is therefore stored as
factors whose product is M / scaling.
"""
from __future__ import annotations

import math

from torch import Tensor

from .solvers import LowRank


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


def to_peft(low_rank: LowRank, scaling: float) -> tuple[Tensor, Tensor]:
    """(lora_A (r, in), lora_B (out, r)) in float32 with scaling * lora_B @ lora_A == M.

    The scaling is divided out evenly between the two factors, so PEFT's forward, which
    multiplies by it, reproduces M exactly (PEFT's own LoftQ init omits this: peft#1982).
    """
    if not scaling > 0:
        raise ValueError(f"LoRA scaling must be positive, got {scaling}")
    root = math.sqrt(scaling)
    lora_A = (low_rank.right / root).float().contiguous()
    lora_B = (low_rank.left / root).float().contiguous()
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
