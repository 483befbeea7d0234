"""Independent float32 references for checking bundles: built from the source weights and the
bundle's files, never from the converter's code."""
from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from quailora_convert.bundle.layout import INIT_ADAPTER_CONFIG, INIT_ADAPTER_DIR, INIT_ADAPTER_WEIGHTS


def bundle_tensors(bundle: Path) -> dict[str, torch.Tensor]:
    files = sorted(Path(bundle).glob("model*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def adapter_tensors(bundle: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(Path(bundle) / INIT_ADAPTER_WEIGHTS), "pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}


def scaling_of(bundle: Path) -> float:
    cfg = json.loads((Path(bundle) / INIT_ADAPTER_CONFIG).read_text())
    return cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg["use_rslora"] else cfg["r"])


def dequantize_saved(tensors: dict[str, torch.Tensor], module: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The (out, in) weight a bnb layer computes with, from the tensors saved under module.

    NF4 dequantizes to the saved dtype (bf16 for a bf16 model), or to dtype when given: a
    float32 forward on CPU dequantizes straight to float32, without the bf16 rounding.
    """
    if f"{module}.SCB" in tensors:
        return bnbF.int8_vectorwise_dequant(tensors[f"{module}.weight"], tensors[f"{module}.SCB"])
    state = bnbF.QuantState.from_dict(
        {k[len(module) + len(".weight."):]: v for k, v in tensors.items() if k.startswith(f"{module}.weight.")},
        device=torch.device("cpu"),
    )
    state.dtype = dtype or state.dtype
    return bnbF.dequantize_4bit(tensors[f"{module}.weight"], state)


def reference_model(source: Path, bundle: Path, with_adapter: bool = True) -> torch.nn.Module:
    """Source model in float32 with every adapted linear set to dequant(Q) + scaling * B @ A (dequant(Q) alone
    when not with_adapter)."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    base, adapter, scaling = bundle_tensors(bundle), adapter_tensors(bundle), scaling_of(bundle)
    scaling = scaling if with_adapter else 0.0
    for key in adapter:
        if not key.endswith("lora_A.weight"):
            continue
        module_path = key[len("base_model.model."):-len(".lora_A.weight")]
        A, B = adapter[key], adapter[key.replace("lora_A", "lora_B")]
        W = dequantize_saved(base, module_path, torch.float32) + scaling * B.float() @ A.float()  # (out, in)
        module = model.get_submodule(module_path)
        with torch.no_grad():
            module.weight.copy_(W.T if type(module).__name__ == "Conv1D" else W)
    return model.eval()


def quantized_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds)}


def dequantize_loaded(module: torch.nn.Module) -> torch.Tensor:
    """What a loaded bnb layer holds, dequantized; call before any forward (CPU repacking)."""
    if isinstance(module, bnb.nn.Linear4bit):
        return bnbF.dequantize_4bit(module.weight.data, module.weight.quant_state)
    return bnbF.int8_vectorwise_dequant(module.weight.data, module.weight.SCB)


def use_float32_compute(model: torch.nn.Module) -> None:
    """Run a loaded bundle in float32 (quantized weights stay as saved), so that it and the
    reference agree to fp tolerance."""
    for param in model.parameters():
        if param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
    for module in quantized_linears(model).values():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = torch.float32


def assert_bundle_matches_reference(source: Path, bundle: Path, ids: torch.Tensor, atol: float = 1e-4) -> None:
    """The loaded bundle (float32, train mode) computes Q + scaling * B @ A, and the adapter matters."""
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(bundle, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, bundle, subfolder=INIT_ADAPTER_DIR)
    use_float32_compute(model)
    model.train()  # as when fine-tuning (no dropout here); eval on AVX512-BF16 CPUs swaps in a bf16 kernel
    reference = reference_model(source, bundle)
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
        assert torch.allclose(got, want, atol=atol, rtol=1e-4), (got - want).abs().max()
        with model.disable_adapter():
            plain = model(ids).logits
    assert not torch.allclose(plain, want, atol=1e-3)  # the adapter does something
