"""bitsandbytes quantization backends, producing exactly what transformers' bnb loader reads.

Each backend turns a weight (out, in) in the checkpoint's dtype into the tensors a saved
bnb layer holds (keyed by suffix after the module name) and the dequantized weight the
loaded layer will compute with, and says how the loader is configured to read them back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from .rounding import CodeGrid

NF4_BLOCKSIZE = 64  # QLoRA's default, and what transformers' loader uses
INT8_LEVELS = 127  # LLM.int8 codes run from -127 to 127; dequantized = code * SCB / 127
INT8_INVERSE_LEVELS = 7.874015718698502e-3  # the float bitsandbytes multiplies by for 1 / 127


@dataclass
class QuantizedWeight:
    tensors: dict[str, Tensor]  # suffix after "<module>." -> tensor, on CPU
    dequantized: Tensor  # (out, in) what the loaded layer multiplies by, on the input's device
    state: Any = None  # the backend's statistics (scales), kept to re-pack other codes on the same grid


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

    def grid(self, quantized: QuantizedWeight) -> CodeGrid:
        """The code table and the per-weight scales the loader multiplies quantized's codes by."""
        ...

    def with_codes(self, quantized: QuantizedWeight, codes: Tensor) -> QuantizedWeight:
        """quantized's statistics with other codes (out, in) into grid(quantized).levels: what bnb would
        have stored had it chosen these codes."""
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
        return self._stored(packed, state)

    def grid(self, quantized: QuantizedWeight) -> CodeGrid:
        import bitsandbytes.functional as bnbF

        state = quantized.state
        block_scales = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset  # (blocks,) float32
        out_features, in_features = state.shape
        scales = block_scales.repeat_interleave(NF4_BLOCKSIZE)[: out_features * in_features]
        return CodeGrid(state.code.float(), scales.view(out_features, in_features))

    def with_codes(self, quantized: QuantizedWeight, codes: Tensor) -> QuantizedWeight:
        return self._stored(pack_nibbles(codes).to(quantized.dequantized.device), quantized.state)

    def state_for_absmax(self, W: Tensor, absmax: Tensor):
        """bnb's QuantState for W (out, in) with other block scales absmax (blocks,) float32, double-quantized
        exactly as quantize_4bit does (offset = mean, 8-bit dynamic codes per 256 blocks); no codes."""
        import bitsandbytes.functional as bnbF

        offset = absmax.mean()
        nested, state2 = bnbF.quantize_blockwise(absmax - offset, blocksize=256)
        return bnbF.QuantState(absmax=nested, shape=W.shape, dtype=W.dtype, blocksize=NF4_BLOCKSIZE,
                               code=bnbF.get_4bit_type("nf4", device=W.device), quant_type="nf4", offset=offset,
                               state2=state2)

    def _stored(self, packed: Tensor, state) -> QuantizedWeight:
        import bitsandbytes.functional as bnbF

        dequantized = bnbF.dequantize_4bit(packed, state)  # (out, in) in W's dtype
        tensors = {"weight": packed.cpu()}
        tensors.update({f"weight.{k}": v.cpu() for k, v in state.as_dict(packed=True).items()})
        return QuantizedWeight(tensors, dequantized, state)

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
        return self._stored(CB, SCB)

    def grid(self, quantized: QuantizedWeight) -> CodeGrid:
        SCB = quantized.state  # (out,) float32 row absmax
        levels = torch.arange(-INT8_LEVELS, INT8_LEVELS + 1, dtype=torch.float32, device=SCB.device)
        return CodeGrid(levels, SCB.view(-1, 1).expand(quantized.dequantized.shape), INT8_INVERSE_LEVELS)

    def with_codes(self, quantized: QuantizedWeight, codes: Tensor) -> QuantizedWeight:
        return self._stored((codes - INT8_LEVELS).to(torch.int8), quantized.state)

    def _stored(self, CB: Tensor, SCB: Tensor) -> QuantizedWeight:
        import bitsandbytes.functional as bnbF

        dequantized = bnbF.int8_vectorwise_dequant(CB, SCB)  # (out, in) float32
        row_format = torch.tensor(0, dtype=torch.uint8)  # bnb's "row" layout marker
        return QuantizedWeight({"weight": CB.cpu(), "SCB": SCB.cpu(), "weight_format": row_format}, dequantized, SCB)

    def stored_bytes(self, out_features: int, in_features: int) -> int:
        return out_features * in_features + 4 * out_features + 1  # int8 codes, float32 row scales, format marker

    def loader_options(self, compute_dtype: torch.dtype) -> dict:
        return dict(load_in_8bit=True)


def pack_nibbles(codes: Tensor) -> Tensor:
    """4-bit codes (out, in) as bitsandbytes stores them: row-major, two per byte, the first in the high
    nibble; uint8 (ceil(numel / 2), 1). An odd count is padded with code 7 (NF4's 0.0), as bnb pads."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_full((1,), 7)])
    pairs = flat.view(-1, 2)
    return (pairs[:, 0] << 4 | pairs[:, 1]).view(-1, 1)


def unpack_nibbles(packed: Tensor, numel: int) -> Tensor:
    """The inverse of pack_nibbles: codes (numel,) int64."""
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[:numel].long()


QUANTIZERS: dict[int, type] = {4: NF4Quantizer, 8: Int8Quantizer}


def quantizer_for(bits: int) -> Quantizer:
    if bits not in QUANTIZERS:
        raise ValueError(f"--bits must be one of {sorted(QUANTIZERS)}, got {bits}")
    return QUANTIZERS[bits]()
