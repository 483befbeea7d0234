"""The per-layer unit of work: materialise -> full-precision forward with H hooks -> per linear:
quantize, solve, report -> write -> release.

A LayerConverter holds what every layer of one conversion needs; convert() calls it once per
decoder layer, so never more than one layer's full-precision weights are in memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..bundle.writer import BundleWriter
from ..calibration.batches import CalibrationBatch
from ..core.joint import Compensated, quantize_and_solve
from ..core.lora import adapter_key, lora_scaling, to_peft
from ..core.quantize import Quantizer
from ..core.solvers import factor_hessian, solve, solve_factored
from ..sources.checkpoint import CheckpointReader, KeyMap, materialize, release
from .architectures import linear_modules, weight_matrix
from .capture import CALIBRATION_DTYPE, InputHessians, LayerCall, accumulate_hessians
from .report import ModuleReport, module_report
from .settings import ConvertSettings


@dataclass
class LayerConverter:
    settings: ConvertSettings
    quantizer: Quantizer
    reader: CheckpointReader
    key_map: KeyMap
    writer: BundleWriter
    batches: list[CalibrationBatch]
    device: torch.device
    stored_dtypes: set[torch.dtype] = field(default_factory=set)  # of the decoder weights in the checkpoint

    def convert(self, prefix: str, layer: nn.Module, targets: dict[str, nn.Module], hidden: list[torch.Tensor],
                calls: list[LayerCall]) -> list[ModuleReport]:
        """Convert the decoder layer at prefix ("model.layers.3."); hidden advances to its outputs."""
        stored = materialize(layer, prefix, self.reader, self.key_map, self.device, CALIBRATION_DTYPE)
        self.stored_dtypes.update(stored.values())
        hessians = accumulate_hessians(layer, targets, hidden, calls, self.batches, self.device)
        linears = linear_modules(layer)
        reports = []
        for name, module in linears.items():
            report = self._convert_linear(prefix, name, module, stored[f"{name}.weight"], hessians, name in targets)
            if report is not None:
                reports.append(report)
        self._copy_extras(prefix, layer, linears)
        release(layer)
        self.reader.release()
        return reports

    def _convert_linear(self, prefix: str, name: str, module: nn.Module, stored_dtype: torch.dtype,
                        hessians: InputHessians, targeted: bool) -> ModuleReport | None:
        """Quantize and write one linear; for a target also solve, write its adapter and report it."""
        path = f"{prefix}{name}"
        W = weight_matrix(module).detach()  # (out, in) float32, exact copy of the stored values
        if not targeted:
            self._add_base(path, self.quantizer.quantize(W.to(stored_dtype)).tensors)
            return None
        if name not in hessians.leader:
            raise RuntimeError(f"{path} was never called during calibration; exclude it with --target-modules")
        s = self.settings
        H = hessians.mean(name)  # (in, in)
        try:
            result = compensate(s, self.quantizer, W, stored_dtype, H)
        except FloatingPointError as e:
            raise FloatingPointError(f"{path}: {e}") from e
        self._add_base(path, result.quantized.tensors)
        lora_A, lora_B = to_peft(result.correction, lora_scaling(s.lora_alpha, s.rank, s.use_rslora))
        self.writer.add_adapter_tensor(adapter_key(path, "lora_A"), lora_A)
        self.writer.add_adapter_tensor(adapter_key(path, "lora_B"), lora_B)
        return module_report(path, f"{prefix}{hessians.leader[name]}", result, H)

    def _add_base(self, path: str, tensors: dict[str, torch.Tensor]) -> None:
        for suffix, tensor in tensors.items():
            self.writer.add_base_tensor(f"{path}.{suffix}", tensor)

    def _copy_extras(self, prefix: str, layer: nn.Module, linears: dict[str, nn.Module]) -> None:
        """Norms, biases and persistent buffers of the layer (all but its linears' weights), copied as stored."""
        quantized = {f"{prefix}{name}.weight" for name in linears}
        for name in layer.state_dict():
            key = f"{prefix}{name}"
            if key not in quantized and key in self.key_map.to_checkpoint:
                self.writer.add_base_tensor(key, self.reader.get(self.key_map.to_checkpoint[key]))


def compensate(s: ConvertSettings, quantizer: Quantizer, W: torch.Tensor, stored_dtype: torch.dtype,
               H: torch.Tensor) -> Compensated:
    """Base codes and correction of one targeted linear W (out, in) with the settings' rounding, solver and
    refinement; H (in, in) is factored once for every solve of the exact solver."""
    rank = min(s.rank, *W.shape)
    if s.solver == "exact":
        factor = factor_hessian(H, W.shape[1], s.damp)

        def solve_error(E: torch.Tensor):
            return solve_factored(E, factor, rank)
    else:
        def solve_error(E: torch.Tensor):
            return solve(E, H, rank, s.solver, s.als_steps, s.damp)
    return quantize_and_solve(W, stored_dtype, H, quantizer, solve_error, s.rounding, s.refine, s.gptq_damp)
