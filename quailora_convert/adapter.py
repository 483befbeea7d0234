"""The PEFT side of a bundle: adapter tensor names and adapter_config.json."""
from __future__ import annotations


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


def adapter_config(base_path: str, target_modules: list[str], rank: int, lora_alpha: float, use_rslora: bool,
                   revision: str | None = None) -> dict:
    from peft import LoraConfig

    config = LoraConfig(
        task_type="CAUSAL_LM", r=rank, lora_alpha=lora_alpha, use_rslora=use_rslora, lora_dropout=0.0,
        bias="none", target_modules=target_modules, init_lora_weights=True,
        base_model_name_or_path=base_path, revision=revision,
    ).to_dict()
    config["target_modules"] = sorted(config["target_modules"])  # a set in LoraConfig; JSON needs a list
    return config
