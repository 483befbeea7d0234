"""The per-layer unit of work: materialise -> full-precision forward with H hooks -> per linear:
quantize, solve, report -> write -> release.

A LayerConverter holds what every layer of one conversion needs; convert() calls it once per
decoder layer, so never more than one layer's full-precision weights are in memory.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..bundle.writer import BundleWriter
from ..calibration.batches import CalibrationBatch
from ..core.joint import Compensated, quantize_and_solve
from ..core.lora import adapter_key, lora_scaling, to_peft
from ..core.quantize import Quantizer
from ..core.rounding import GptqFactor, gptq_factor
from ..core.scales import CalibratedScalesQuantizer
from ..core.solvers import HessianFactor, factor_hessian, solve, solve_factored
from ..errors import BadInputError
from ..sources.checkpoint import CheckpointReader, KeyMap, materialize, release
from .allocator import heap_for_forward
from .architectures import linear_modules, weight_matrix
from .capture import CALIBRATION_DTYPE, InputHessians, LayerCall, accumulate_hessians
from .phases import PhaseTimer
from .prefetch import LayerPrefetch
from .ranks import Ranks
from .report import ModuleReport, module_report
from .settings import ConvertSettings


@dataclass
class LinearResult:
    """What one linear of a layer adds to the bundle: its base tensors, and for a target its adapter and report."""

    base: dict[str, Tensor]  # suffix ("weight", "weight.absmax", ...) -> tensor
    lora_A: Tensor | None = None
    lora_B: Tensor | None = None
    report: ModuleReport | None = None


@dataclass
class LayerConverter:
    settings: ConvertSettings
    quantizer: Quantizer
    reader: CheckpointReader
    key_map: KeyMap
    writer: BundleWriter | None  # rank 0's; None on the other ranks
    batches: list[CalibrationBatch]  # this rank's share
    device: torch.device
    timer: PhaseTimer
    stored_dtypes: set[torch.dtype] = field(default_factory=set)  # of the decoder weights in the checkpoint
    ranks: Ranks = field(default_factory=Ranks)
    calib_dtype: torch.dtype = CALIBRATION_DTYPE  # the layers are materialised and run in it
    prefetch: LayerPrefetch | None = None  # reads the next layer while this one runs

    def convert(self, prefix: str, layer: nn.Module, targets: dict[str, nn.Module], hidden: list[torch.Tensor],
                calls: list[LayerCall], following: tuple[str, nn.Module] | None = None) -> list[ModuleReport]:
        """Convert the decoder layer at prefix ("model.layers.3."); hidden advances to its outputs.
        following: the next layer's (prefix, meta layer), read ahead while this one runs (with a prefetch).
        With several ranks every rank calls it; rank 0 writes and returns the reports, the others return []."""
        ranks = self.ranks
        stored = ranks.together(lambda: self._read(prefix, layer))
        if self.prefetch is not None and following is not None:
            self.prefetch.schedule(*following)
        hessians = ranks.together(lambda: self._forward(layer, targets, hidden, calls))
        linears = linear_modules(layer)
        owner = self._share_hessians(hessians, linears, targets)
        mine = ranks.together(lambda: self._convert_mine(prefix, linears, stored, hessians, owner, targets))
        results: dict[str, LinearResult] = {}
        for part in ranks.gather(mine) or []:
            results.update(part)
        reports = ranks.on_main(lambda: self._write(prefix, layer, linears, results), elsewhere=[])
        release(layer)
        self.reader.release()
        return reports

    def _read(self, prefix: str, layer: nn.Module) -> dict[str, torch.dtype]:
        with self.timer.phase("read"):  # the wait for a prefetched layer, or the whole read without one
            read = self.prefetch.take(prefix) if self.prefetch is not None else None
            stored = materialize(layer, prefix, self.reader, self.key_map, self.device, self.calib_dtype, read)
        if self.calib_dtype != CALIBRATION_DTYPE:  # a half dtype holds the weights exactly only if they are stored in it
            for name in linear_modules(layer):
                if stored[f"{name}.weight"] != self.calib_dtype:
                    raise BadInputError(
                        f"{prefix}{name}.weight is stored as {str(stored[f'{name}.weight']).removeprefix('torch.')}: "
                        f"--calib-dtype {str(self.calib_dtype).removeprefix('torch.')} would round it before it is "
                        "quantized; use --calib-dtype auto or float32")
        self.stored_dtypes.update(stored.values())
        return stored

    def _forward(self, layer: nn.Module, targets: dict[str, nn.Module], hidden: list[torch.Tensor],
                 calls: list[LayerCall]) -> InputHessians:
        with self.timer.phase("forward"), heap_for_forward():
            return accumulate_hessians(layer, targets, hidden, calls, self.batches, self.device, self.timer,
                                       self.calib_dtype, getattr(torch, self.settings.hessian_dtype))

    def _share_hessians(self, hessians: InputHessians, linears: dict[str, nn.Module],
                        targets: dict[str, nn.Module]) -> dict[str, int]:
        """Each input group's owner rank (by solve cost), holding its H summed over the ranks; every
        rank's token counts summed. A world of one owns everything and moves nothing."""
        ranks = self.ranks
        leaders = list(hessians.sums)  # the hooks' order: the same on every rank
        costs = []
        for leader in leaders:
            n = hessians.sums[leader].sum.shape[0]
            members = [weight_matrix(linears[name]).shape[0] for name in targets if hessians.leader.get(name) == leader]
            costs.append(float(n) ** 3 + sum(out * float(n) ** 2 for out in members))
        owner = dict(zip(leaders, ranks.owners(costs)))
        if ranks.size > 1 and leaders:
            with self.timer.phase("hessian"):
                for leader in leaders:
                    ranks.reduce_sum(hessians.sums[leader].sum, owner[leader])
                totals = ranks.all_sum([hessians.sums[leader].tokens for leader in leaders])
            for leader, tokens in zip(leaders, totals):
                hessians.sums[leader].tokens = tokens
        return owner

    def _convert_mine(self, prefix: str, linears: dict[str, nn.Module], stored: dict[str, torch.dtype],
                      hessians: InputHessians, owner: dict[str, int], targets: dict[str, nn.Module],
                      ) -> dict[str, LinearResult]:
        """This rank's share of the layer's linears: the targets of the input groups it owns, and on
        rank 0 the linears that are not targeted (quantized only)."""
        mine = {}  # name -> targeted
        for name in linears:
            targeted = name in targets
            if targeted and name not in hessians.leader:
                raise RuntimeError(f"{prefix}{name} was never called during calibration; exclude it with "
                                   "--target-modules")
            if (owner[hessians.leader[name]] if targeted else 0) == self.ranks.rank:
                mine[name] = targeted
        left = Counter(hessians.leader[name] for name, targeted in mine.items() if targeted)  # modules per group
        groups: dict[str, GroupFactors] = {}  # input group leader -> its H's factorisations
        results = {}
        for name, targeted in mine.items():
            results[name] = self._convert_linear(prefix, name, linears[name], stored[f"{name}.weight"], hessians,
                                                 groups, targeted)
            if targeted:
                leader = hessians.leader[name]
                left[leader] -= 1
                if not left[leader]:  # the group's last module: its H and factors go (3 x in^2 floats at 70B)
                    groups.pop(leader, None)
                    hessians.sums.pop(leader, None)
        return results

    def _convert_linear(self, prefix: str, name: str, module: nn.Module, stored_dtype: torch.dtype,
                        hessians: InputHessians, groups: dict[str, GroupFactors], targeted: bool) -> LinearResult:
        """Quantize one linear; for a target also solve its correction and report it."""
        path = f"{prefix}{name}"
        W = weight_matrix(module).detach()  # (out, in) in the calibration dtype, exactly the stored values
        if not targeted:
            with self.timer.phase("quantize"):
                return LinearResult(self.quantizer.quantize(W.to(stored_dtype)).tensors)
        s = self.settings
        leader = hessians.leader[name]
        if leader not in groups:
            groups[leader] = GroupFactors(hessians.mean(name), s.damp, s.gptq_damp)
        group = groups[leader]
        try:
            result = compensate(s, self.quantizer, W, stored_dtype, group, self.timer)
        except FloatingPointError as e:
            raise FloatingPointError(f"{path}: {e}") from e
        lora_A, lora_B = (factor.cpu() for factor in  # what rank 0 gathers and writes: host tensors
                          to_peft(result.correction, lora_scaling(s.lora_alpha, s.rank, s.use_rslora),
                                  s.lora_split))
        with self.timer.phase("solve"):
            report = module_report(path, f"{prefix}{leader}", result, group.H, s.report_baseline,
                                   hessians.input_max.get(name, 0.0), hessians.output_max.get(name, 0.0))
        return LinearResult(result.quantized.tensors, lora_A, lora_B, report)

    def _write(self, prefix: str, layer: nn.Module, linears: dict[str, nn.Module],
               results: dict[str, LinearResult]) -> list[ModuleReport]:
        """Rank 0: every linear's tensors in the layer's order, then the layer's other tensors."""
        reports = []
        with self.timer.phase("write"):
            for name in linears:
                result = results[name]
                for suffix, tensor in result.base.items():
                    self.writer.add_base_tensor(f"{prefix}{name}.{suffix}", tensor)
                if result.report is not None:
                    self.writer.add_adapter_tensor(adapter_key(f"{prefix}{name}", "lora_A"), result.lora_A)
                    self.writer.add_adapter_tensor(adapter_key(f"{prefix}{name}", "lora_B"), result.lora_B)
                    reports.append(result.report)
        self._copy_extras(prefix, layer, linears)
        return reports

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
        scaled = CalibratedScalesQuantizer(quantizer, H) if s.scales == "calibrated" else None
        result = quantize_and_solve(W, stored_dtype, H, scaled or quantizer, solve_error, s.rounding, s.refine,
                                    s.gptq_damp, gptq)
    if scaled is not None:  # the report's round-to-nearest stays bitsandbytes' own, on its absmax
        result.error_nearest = scaled.choice.error_absmax
        result.calibrated_scale_rows = scaled.choice.rows_calibrated
    return result
