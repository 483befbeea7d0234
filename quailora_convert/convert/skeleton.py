"""The model as a meta-device skeleton built from config.json, and its front loaded for the capture."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..bundle.layout import read_config
from ..errors import BadInputError
from ..sources.checkpoint import CheckpointReader, KeyMap, release
from .capture import CALIBRATION_DTYPE


def build_skeleton(folder: Path, device: torch.device, trust_remote_code: bool,
                   dtype: torch.dtype = CALIBRATION_DTYPE) -> tuple[nn.Module, object]:
    """(model, tokenizer): the model on the meta device, its buffers (rotary tables) real on device.

    Attention is transformers' default: SDPA where the architecture supports it, else eager
    (Gemma 2's soft-capped attention has no SDPA path).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_remote_code(folder, trust_remote_code)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            module._buffers[name] = buffer.to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return model, tokenizer


def check_remote_code(folder: Path, trust_remote_code: bool) -> None:
    """Custom modeling code (config.json's auto_map) runs only when the user says so."""
    auto_map = read_config(folder).get("auto_map") or {}
    if "AutoModelForCausalLM" in auto_map and not trust_remote_code:
        raise BadInputError(f"this model runs its own code ({auto_map['AutoModelForCausalLM']}); read it, then pass "
                            "--trust-remote-code to allow it")


@contextmanager
def front_materialized(model: nn.Module, layers_path: str, reader: CheckpointReader, key_map: KeyMap,
                       device: torch.device, dtype: torch.dtype = CALIBRATION_DTYPE) -> Iterator[None]:
    """Every parameter outside the decoder layers loaded (except the output head, never run), then released."""
    head = model.get_output_embeddings()
    head_weight = id(head.weight) if head is not None else None
    owners = set()
    for name, param in model.named_parameters():
        if name.startswith(layers_path + ".") or id(param) == head_weight:
            continue
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        tensor = reader.get(key_map.checkpoint_key(name))
        setattr(module, leaf, nn.Parameter(tensor.to(device, dtype), requires_grad=False))
        owners.add(owner)
    try:
        yield
    finally:
        for owner in sorted(owners):
            release(model.get_submodule(owner))
