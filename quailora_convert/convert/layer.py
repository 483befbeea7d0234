"""The per-layer unit of work: materialise -> full-precision forward with H hooks -> per linear:
quantize, solve, report -> write -> release.

A LayerConverter holds what every layer of one conversion needs; convert() calls it once per
decoder layer, so never more than one layer's full-precision weights are in memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..bundle.writer import BundleWriter
from ..calibration.batches import CalibrationBatch
from ..core.joint import Compensated, quantize_and_solve
from ..core.lora import adapter_key, lora_scaling, to_peft
from ..core.quantize import Quantizer
from ..core.rounding import GptqFactor, gptq_factor
from ..core.solvers import HessianFactor, factor_hessian, solve, solve_factored
from ..sources.checkpoint import CheckpointReader, KeyMap, materialize, release
from .architectures import linear_modules, weight_matrix
from .capture import CALIBRATION_DTYPE, InputHessians, LayerCall, accumulate_hessians
from .phases import PhaseTimer
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
    timer: PhaseTimer
    stored_dtypes: set[torch.dtype] = field(default_factory=set)  # of the decoder weights in the checkpoint

    def convert(self, prefix: str, layer: nn.Module, targets: dict[str, nn.Module], hidden: list[torch.Tensor],
                calls: list[LayerCall]) -> list[ModuleReport]:
        """Convert the decoder layer at prefix ("model.layers.3."); hidden advances to its outputs."""
        with self.timer.phase("read"):
            stored = materialize(layer, prefix, self.reader, self.key_map, self.device, CALIBRATION_DTYPE)
        self.stored_dtypes.update(stored.values())
        with self.timer.phase("forward"):
            hessians = accumulate_hessians(layer, targets, hidden, calls, self.batches, self.device, self.timer)
        linears = linear_modules(layer)
        groups: dict[str, GroupFactors] = {}  # input group leader -> its H's factorisations
        reports = []
        for name, module in linears.items():
            report = self._convert_linear(prefix, name, module, stored[f"{name}.weight"], hessians, groups,
                                          name in targets)
            if report is not None:
                reports.append(report)
        self._copy_extras(prefix, layer, linears)
        release(layer)
        self.reader.release()
        return reports

    def _convert_linear(self, prefix: str, name: str, module: nn.Module, stored_dtype: torch.dtype,
                        hessians: InputHessians, groups: dict[str, GroupFactors], targeted: bool) -> ModuleReport | None:
        """Quantize and write one linear; for a target also solve, write its adapter and report it."""
        path = f"{prefix}{name}"
        W = weight_matrix(module).detach()  # (out, in) float32, exact copy of the stored values
        if not targeted:
            with self.timer.phase("quantize"):
                tensors = self.quantizer.quantize(W.to(stored_dtype)).tensors
            self._add_base(path, tensors)
            return None
        if name not in hessians.leader:
            raise RuntimeError(f"{path} was never called during calibration; exclude it with --target-modules")
        s = self.settings
        leader = hessians.leader[name]
        if leader not in groups:
            groups[leader] = GroupFactors(hessians.mean(name), s.damp, s.gptq_damp)
        group = groups[leader]
        try:
            result = compensate(s, self.quantizer, W, stored_dtype, group, self.timer)
        except FloatingPointError as e:
            raise FloatingPointError(f"{path}: {e}") from e
        self._add_base(path, result.quantized.tensors)
        lora_A, lora_B = to_peft(result.correction, lora_scaling(s.lora_alpha, s.rank, s.use_rslora))
        with self.timer.phase("write"):
            self.writer.add_adapter_tensor(adapter_key(path, "lora_A"), lora_A)
            self.writer.add_adapter_tensor(adapter_key(path, "lora_B"), lora_B)
        with self.timer.phase("solve"):
            return module_report(path, f"{prefix}{leader}", result, group.H)

    def _add_base(self, path: str, tensors: dict[str, torch.Tensor]) -> None:
        with self.timer.phase("write"):
            for suffix, tensor in tensors.items():
                self.writer.add_base_tensor(f"{path}.{suffix}", tensor)

    def _copy_extras(self, prefix: str, layer: nn.Module, linears: dict[str, nn.Module]) -> None:
        """Norms, biases and persistent buffers of the layer (all but its linears' weights), copied as stored."""
        quantized = {f"{prefix}{name}.weight" for name in linears}
        for name in layer.state_dict():
            key = f"{prefix}{name}"
            if key not in quantized and key in self.key_map.to_checkpoint:
                with self.timer.phase("read"):
                    tensor = self.reader.get(self.key_map.to_checkpoint[key])
                with self.timer.phase("write"):
                    self.writer.add_base_tensor(key, tensor)


@dataclass
class GroupFactors:
    """One input group's H (q/k/v share one) and its factorisations, each made on first use and then
    shared by every module of the group and every refinement round."""

    H: Tensor  # (in, in)
    damp: float  # the exact solver's ridge
    gptq_damp: float
    _hessian: HessianFactor | None = None
    _gptq: GptqFactor | None = None

    def hessian(self) -> HessianFactor:
        if self._hessian is None:
            self._hessian = factor_hessian(self.H, self.H.shape[0], self.damp)
        return self._hessian

    def gptq(self) -> GptqFactor:
        if self._gptq is None:
            self._gptq = gptq_factor(self.H, self.gptq_damp)
        return self._gptq


def compensate(s: ConvertSettings, quantizer: Quantizer, W: Tensor, stored_dtype: torch.dtype,
               group: GroupFactors, timer: PhaseTimer | None = None) -> Compensated:
    """Base codes and correction of one targeted linear W (out, in) with the settings' rounding, solver and
    refinement, against its input group's H; the timer is charged "quantize" and "solve"."""
    timer = timer or PhaseTimer(W.device)
    rank = min(s.rank, *W.shape)
    H = group.H
    if s.solver == "exact":
        with timer.phase("solve"):
            factor = group.hessian()

        def solve_once(E: Tensor):
            return solve_factored(E, factor, rank)
    else:
        def solve_once(E: Tensor):
            return solve(E, H, rank, s.solver, s.als_steps, s.damp)

    def solve_error(E: Tensor):
        with timer.phase("solve"):
            return solve_once(E)

    with timer.phase("quantize"):
        gptq = group.gptq() if s.rounding == "gptq" else None
        return quantize_and_solve(W, stored_dtype, H, quantizer, solve_error, s.rounding, s.refine, s.gptq_damp, gptq)
