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
