"""The JSON a bundle's loaders read: config.json with quantization_config, and adapter_config.json.

Both are built by the libraries that read them back (transformers' BitsAndBytesConfig, PEFT's
LoraConfig), so every field has the value and spelling those versions expect.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def quantized_config(source_config: dict, loader_options: dict, skip_modules: list[str],
                     dtype: torch.dtype | None = None) -> dict:
    """The source's config.json with the quantization_config that loads the quantized base.

    loader_options are BitsAndBytesConfig's keyword arguments (the quantizer's loader_options);
    skip_modules are the linears left in full precision (outside the decoder layers). dtype: replaces the
    dtype the source declares (`dtype`, and the older `torch_dtype` where it is spelled so), when the bundle
    computes in another one.
    """
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(**loader_options).to_dict()
    quantization["llm_int8_skip_modules"] = skip_modules or None
    config = {**source_config, "quantization_config": quantization}
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        config.update({key: name for key in ("dtype", "torch_dtype") if key in source_config} or {"dtype": name})
    return config


def adapter_config(base_path: str, target_modules: list[str], rank: int, lora_alpha: float, use_rslora: bool,
                   rank_pattern: dict[str, int] | None = None, alpha_pattern: dict[str, float] | None = None) -> dict:
    """adapter_config.json of a LoRA adapter over the base at base_path (a folder or a Hub repo).

    rank_pattern / alpha_pattern: modules whose rank is not `rank` (core.lora.rank_patterns).
    """
    from peft import LoraConfig

    config = LoraConfig(
        task_type="CAUSAL_LM", r=rank, lora_alpha=lora_alpha, use_rslora=use_rslora, lora_dropout=0.0,
        bias="none", target_modules=target_modules, init_lora_weights=True,
        rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {},
        base_model_name_or_path=base_path,
    ).to_dict()
    config["target_modules"] = sorted(config["target_modules"])  # a set in LoraConfig; JSON needs a list
    return config
