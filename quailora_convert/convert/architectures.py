"""Architecture knowledge as data: where the decoder layers live and which modules are linears.

Everything else (what runs before layer 0, which linears share one input) is found from the
model itself at run time, so an architecture missing from the table still converts when the
generic fallback finds its decoder layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BadInputError, UnsupportedModelError


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # dotted path from the CausalLM to the nn.ModuleList of decoder layers


ARCH_SPECS: dict[str, ArchSpec] = {
    "llama": ArchSpec("model.layers"),
    "mistral": ArchSpec("model.layers"),
    "qwen2": ArchSpec("model.layers"),
    "qwen3": ArchSpec("model.layers"),
    "gemma": ArchSpec("model.layers"),
    "gemma2": ArchSpec("model.layers"),
    "gemma3_text": ArchSpec("model.layers"),
    "phi3": ArchSpec("model.layers"),
    "opt": ArchSpec("model.decoder.layers"),
    "bloom": ArchSpec("transformer.h"),
    "gpt2": ArchSpec("transformer.h"),
    "gpt_neox": ArchSpec("gpt_neox.layers"),
}


def _linear_kinds() -> dict[type, bool]:
    """Module types that hold a linear map, mapped to whether their weight is stored (in, out)."""
    from transformers.pytorch_utils import Conv1D

    return {nn.Linear: False, Conv1D: True}


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layers: from ARCH_SPECS, else the ModuleList of num_hidden_layers blocks."""
    config = model.config
    spec = ARCH_SPECS.get(config.model_type)
    if spec is not None:
        return spec.layers, model.get_submodule(spec.layers)
    count = getattr(config, "num_hidden_layers", None)
    candidates = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == count
    ]
    if len(candidates) != 1:
        found = ", ".join(name for name, _ in candidates) or "none"
        raise UnsupportedModelError(
            f"cannot locate the decoder layers of model_type {config.model_type!r} "
            f"(ModuleLists of {count} blocks: {found}); add it to ARCH_SPECS"
        )
    return candidates[0]


def linear_modules(module: nn.Module) -> dict[str, nn.Module]:
    """Every linear (nn.Linear or GPT-2 Conv1D) below module, by relative name."""
    kinds = tuple(_linear_kinds())
    return {name: m for name, m in module.named_modules() if name and isinstance(m, kinds)}


def is_transposed(module: nn.Module) -> bool:
    """True for Conv1D, whose weight is stored (in, out) instead of (out, in)."""
    for kind, transposed in _linear_kinds().items():
        if isinstance(module, kind):
            return transposed
    raise TypeError(f"{type(module).__name__} is not a linear module")


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), whatever the module's storage convention."""
    W = module.weight
    return W.T if is_transposed(module) else W


def check_supported(layer: nn.Module, layer_path: str) -> None:
    """Refuse layers with weights we cannot quantize as linears (fused MoE experts)."""
    linear_params = {id(m.weight) for m in linear_modules(layer).values()}
    for name, param in layer.named_parameters():
        if param.ndim >= 3 and id(param) not in linear_params:
            raise UnsupportedModelError(
                f"{layer_path}.{name} is a {param.ndim}-D weight {tuple(param.shape)}: mixture-of-experts "
                "layers whose experts are not nn.Linear are unsupported"
            )


def select_targets(layer: nn.Module, target_modules: str | list[str]) -> dict[str, nn.Module]:
    """The linears of one decoder layer that get a LoRA adapter.

    "all-linear" takes every linear in the layer; otherwise names match the last component(s)
    of the module path, as PEFT matches target_modules (q_proj, mlp.c_proj, ...).
    """
    linears = linear_modules(layer)
    if target_modules == "all-linear":
        return linears
    chosen = {
        name: m for name, m in linears.items()
        if any(name == t or name.endswith("." + t) for t in target_modules)
    }
    return chosen


def layer_targets(layers: nn.ModuleList, layers_path: str, target_modules: str | list[str]) -> list[dict[str, nn.Module]]:
    """select_targets of every decoder layer (each checked as supported); refuses a choice that matches nothing."""
    targets = []
    for index, layer in enumerate(layers):
        check_supported(layer, f"{layers_path}.{index}")
        targets.append(select_targets(layer, target_modules))
    if not any(targets):
        available = ", ".join(sorted(linear_modules(layers[0])))
        raise BadInputError(f"--target-modules {','.join(target_modules)} matches no linear; a layer has: {available}")
    return targets
