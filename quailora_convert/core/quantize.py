"""bitsandbytes quantization backends, producing exactly what transformers' bnb loader reads.

Each backend turns a weight (out, in) in the checkpoint's dtype into the tensors a saved
bnb layer holds (keyed by suffix after the module name) and the dequantized weight the
loaded layer will compute with, and says how the loader is configured to read them back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

NF4_BLOCKSIZE = 64  # QLoRA's default, and what transformers' loader uses


@dataclass
class QuantizedWeight:
    tensors: dict[str, Tensor]  # suffix after "<module>." -> tensor, on CPU
    dequantized: Tensor  # (out, in) what the loaded layer multiplies by, on the input's device


class Quantizer(Protocol):
    bits: int
    name: str

    def quantize(self, W: Tensor) -> QuantizedWeight: ...

    def loader_options(self, compute_dtype: torch.dtype) -> dict:
        """Keyword arguments of transformers' BitsAndBytesConfig that load these tensors."""
        ...

    def stored_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes of the tensors quantize() returns for an (out, in) weight (plans and disk checks)."""
        ...


class NF4Quantizer:
    """bitsandbytes NF4, blocksize 64, double-quantized statistics (QLoRA)."""

    bits = 4
    name = "nf4"

    def quantize(self, W: Tensor) -> QuantizedWeight:
        import bitsandbytes.functional as bnbF

        packed, state = bnbF.quantize_4bit(
            W.contiguous(), blocksize=NF4_BLOCKSIZE, compress_statistics=True, quant_type="nf4",
            quant_storage=torch.uint8,
        )
        dequantized = bnbF.dequantize_4bit(packed, state)  # (out, in) in W's dtype
        tensors = {"weight": packed.cpu()}
        tensors.update({f"weight.{k}": v.cpu() for k, v in state.as_dict(packed=True).items()})
        return QuantizedWeight(tensors, dequantized)

    def stored_bytes(self, out_features: int, in_features: int) -> int:
        n = out_features * in_features
        blocks = -(-n // NF4_BLOCKSIZE)
        # packed codes, uint8 absmax per block, float32 absmax per 256 blocks, the two code tables, quant_state
        return -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4 * (16 + 256) + 192

    def loader_options(self, compute_dtype: torch.dtype) -> dict:
        return dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=torch.uint8)


class Int8Quantizer:
    """bitsandbytes LLM.int8 weights: row-wise absmax int8, statistics in float32 (SCB)."""

    bits = 8
    name = "int8"

    def quantize(self, W: Tensor) -> QuantizedWeight:
        import bitsandbytes.functional as bnbF

        CB, SCB, _ = bnbF.int8_vectorwise_quant(W.contiguous().to(torch.float16))  # as Int8Params does
        dequantized = bnbF.int8_vectorwise_dequant(CB, SCB)  # (out, in) float32
        row_format = torch.tensor(0, dtype=torch.uint8)  # bnb's "row" layout marker
        return QuantizedWeight({"weight": CB.cpu(), "SCB": SCB.cpu(), "weight_format": row_format}, dequantized)

    def stored_bytes(self, out_features: int, in_features: int) -> int:
        return out_features * in_features + 4 * out_features + 1  # int8 codes, float32 row scales, format marker

    def loader_options(self, compute_dtype: torch.dtype) -> dict:
        return dict(load_in_8bit=True)


QUANTIZERS: dict[int, type] = {4: NF4Quantizer, 8: Int8Quantizer}


def quantizer_for(bits: int) -> Quantizer:
    if bits not in QUANTIZERS:
        raise ValueError(f"--bits must be one of {sorted(QUANTIZERS)}, got {bits}")
    return QUANTIZERS[bits]()
