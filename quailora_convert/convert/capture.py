"""Activation plumbing: record what the model feeds its decoder layers, and accumulate H per layer.

The front of the model (embeddings, rotary tables, masks) runs once per batch with every decoder
layer's forward replaced by a recorder, so each layer's own call arguments are kept: models that
give different layers different masks or position embeddings (Gemma 2/3) replay correctly. Each
layer then runs in full precision on the previous layer's outputs, with forward pre-hooks summing
H = X X^T for every group of linears that share one input.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..calibration.batches import CalibrationBatch, position_count
from ..core.hessian import HessianSum
from .host_memory import pinned
from .phases import PhaseTimer

CALIBRATION_DTYPE = torch.float32  # the paper's X comes from the full-precision model (--calib-dtype float32)
CACHE_ARGUMENTS = ("past_key_values", "past_key_value", "layer_past")
# every calibration sample's layer inputs stay on a CUDA device (no host round trip per layer) when they take at
# most this share of its free memory: 128 x 2048 x 4096 in bfloat16 is 2 GiB
DEVICE_ACTIVATIONS_SHARE = 0.25


class _StopForward(Exception):
    """Raised by the last layer's recorder: nothing after the decoder layers needs to run."""


@dataclass
class LayerCall:
    """How the model calls one decoder layer for one batch, minus the hidden states."""

    kwargs: dict[str, object] = field(default_factory=dict)


def capture_layer_calls(model: nn.Module, layers: nn.ModuleList, batches: list[CalibrationBatch],
                        device: torch.device, embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        dtype: torch.dtype = CALIBRATION_DTYPE, keep_on_device: bool = False,
                        ) -> tuple[list[torch.Tensor], list[list[LayerCall]]]:
    """Run the model front on every batch; return layer-0 inputs (on CPU; on the device with keep_on_device)
    and every layer's call.

    calls[layer][batch] holds the keyword arguments (KV cache dropped, use_cache False), with
    tensors moved to CPU once and shared between layers that receive the same object. embed:
    input_ids -> inputs_embeds, instead of the model's own embedding (a timing probe without weights).
    dtype: of the kept layer-0 inputs (the calibration dtype).
    """
    hidden: list[torch.Tensor] = []
    calls: list[list[LayerCall]] = [[] for _ in layers]
    for batch in batches:
        offloaded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        recorders = [_recorder(layer, i, len(layers), calls[i], hidden, offloaded, dtype, keep_on_device)
                     for i, layer in enumerate(layers)]
        for layer, recorder in zip(layers, recorders):
            layer.forward = recorder
        try:
            ids = batch.input_ids.to(device)
            inputs = dict(input_ids=ids) if embed is None else dict(inputs_embeds=embed(ids))
            model(**inputs, attention_mask=batch.attention_mask.to(device), use_cache=False)
        except _StopForward:
            pass
        finally:
            for layer in layers:
                del layer.forward
        if len(calls[-1]) != len(hidden):
            raise RuntimeError("the model's forward did not reach its last decoder layer")
    _host_copies_done(device)
    return hidden, calls


def _recorder(layer: nn.Module, index: int, count: int, calls: list[LayerCall], hidden: list[torch.Tensor],
              offloaded: dict[int, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype, keep_on_device: bool):
    signature = inspect.signature(type(layer).forward)

    def record(*args, **kwargs):
        bound = signature.bind(layer, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop("self")
        extra = arguments.pop(_var_keyword(signature), {}) or {}
        names = list(arguments)
        hidden_states = arguments.pop(names[0])
        arguments.update(extra)
        for name in CACHE_ARGUMENTS:
            if name in arguments:
                arguments[name] = None
        if "use_cache" in arguments:
            arguments["use_cache"] = False
        calls.append(LayerCall({k: _offload(v, offloaded) for k, v in arguments.items()}))
        if index == 0:
            kept = hidden_states.detach()
            hidden.append(kept.to(dtype) if keep_on_device else to_host(kept, dtype))
        if index == count - 1:
            raise _StopForward
        return (hidden_states,)  # ignored: only layer 0's input is kept

    return record


def _var_keyword(signature: inspect.Signature) -> str | None:
    for name, p in signature.parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            return name
    return None


def _offload(value, offloaded: dict[int, tuple[torch.Tensor, torch.Tensor]]):
    """Move tensors (also inside tuples/lists) to CPU, once per tensor object.

    offloaded maps id(original) -> (original, copy); holding the original keeps its id unique.
    """
    if isinstance(value, torch.Tensor):
        if id(value) not in offloaded:
            offloaded[id(value)] = (value, value.detach().to("cpu"))
        return offloaded[id(value)][1]
    if isinstance(value, (tuple, list)):
        return type(value)(_offload(v, offloaded) for v in value)
    return value


def to_host(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """tensor as dtype in host memory. From a CUDA device: into pinned memory (within its budget,
    host_memory), asynchronously, so the next batch's kernels queue behind the copy instead of waiting for
    it (_host_copies_done before the host reads)."""
    if tensor.device.type != "cuda":
        return tensor.to("cpu", dtype)
    host = pinned(tensor.shape, dtype)
    host.copy_(tensor.to(dtype), non_blocking=host.is_pinned())
    return host


def _host_copies_done(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_device(value, device: torch.device, moved: dict[int, torch.Tensor]):
    """The inverse of _offload for one batch: each CPU tensor moved once, shared where it was."""
    if isinstance(value, torch.Tensor):
        if id(value) not in moved:
            moved[id(value)] = value.to(device)
        return moved[id(value)]
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device, moved) for v in value)
    return value


def cast_floating(value, dtype: torch.dtype):
    """Floating tensors (position embeddings, additive masks) in the calibration dtype."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(cast_floating(v, dtype) for v in value)
    return value


@dataclass
class InputHessians:
    """H of each input group of one layer, and the group every hooked linear belongs to."""

    leader: dict[str, str]  # module name -> name of its group's first module (q/k/v share q's)
    sums: dict[str, HessianSum]  # group leader -> its running sum
    # module name -> the largest |value| of its calibration inputs / outputs (padding included: a loaded bundle
    # computes those positions too); what the bundle's compute dtype must hold
    input_max: dict[str, float] = field(default_factory=dict)
    output_max: dict[str, float] = field(default_factory=dict)

    def mean(self, name: str) -> torch.Tensor:
        return self.sums[self.leader[name]].mean()  # (in, in)


def accumulate_hessians(layer: nn.Module, targets: dict[str, nn.Module], hidden: list[torch.Tensor],
                        calls: list[LayerCall], batches: list[CalibrationBatch], device: torch.device,
                        timer: PhaseTimer | None = None, dtype: torch.dtype = CALIBRATION_DTYPE,
                        hessian_dtype: torch.dtype = torch.float32) -> InputHessians:
    """Forward of every batch through one layer in the calibration dtype (float32: full precision; the layer
    is materialised in it): H (float32) of its targets' inputs.

    hidden[b] (layer input on CPU, or on the device: see activations_on_device) is replaced by the layer's
    output, the next layer's input, kept where the input was.
    The timer, if any, is charged "hessian" for the H updates; hessian_dtype: the inputs of the H update
    (HessianSum's input_dtype).
    """
    hooks = HessianHooks(targets, device, timer or PhaseTimer(device), hessian_dtype)
    try:
        with torch.no_grad():
            for b, batch in enumerate(batches):
                moved: dict[int, torch.Tensor] = {}
                kwargs = cast_floating(to_device(calls[b].kwargs, device, moved), dtype)
                hooks.start_batch(batch.token_mask.to(device))
                output = layer(hidden[b].to(device, non_blocking=hidden[b].is_pinned()), **kwargs)
                output = output[0] if isinstance(output, (tuple, list)) else output
                hidden[b] = output.to(dtype) if hidden[b].device == output.device else to_host(output, dtype)
        _host_copies_done(device)
    finally:
        hooks.remove()
    inputs, outputs = hooks.largest()
    return InputHessians(hooks.leader, hooks.sums, inputs, outputs)


class HessianHooks:
    """Forward pre-hooks that accumulate H for each input group of one layer's target linears.

    Linears fed the very same tensor object (q/k/v; gate/up) form one group with one H: the
    grouping is read off the first batch, not from names.
    """

    def __init__(self, modules: dict[str, nn.Module], device: torch.device, timer: PhaseTimer,
                 hessian_dtype: torch.dtype = torch.float32):
        self.device = device
        self.timer = timer
        self.hessian_dtype = hessian_dtype
        self.leader: dict[str, str] = {}  # module name -> name of its group's first module
        self.sums: dict[str, HessianSum] = {}
        self._token_mask: torch.Tensor | None = None
        self._seen: list[tuple[torch.Tensor, str]] = []
        self._input_max: dict[str, torch.Tensor] = {}  # group leader -> running max |input| (0-dim, on device)
        self._output_max: dict[str, torch.Tensor] = {}  # module name -> running max |output|
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]
        self._handles += [m.register_forward_hook(self._output_hook(name)) for name, m in modules.items()]

    def start_batch(self, token_mask: torch.Tensor) -> None:
        self._token_mask = token_mask
        self._seen = []

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            if name not in self.leader:
                same = next((leader for seen, leader in self._seen if seen is x), None)
                self.leader[name] = same or name
            self._seen.append((x, self.leader[name]))  # a strong reference keeps x's identity unique
            if self.leader[name] == name:
                with self.timer.phase("hessian"):
                    if name not in self.sums:
                        self.sums[name] = HessianSum(x.shape[-1], self.device, self.hessian_dtype)
                    self.sums[name].add(x, self._token_mask)
                    _running_max(self._input_max, name, x)
        return hook

    def _output_hook(self, name: str):
        def hook(module, args, output):
            _running_max(self._output_max, name, output[0] if isinstance(output, (tuple, list)) else output)
        return hook

    def largest(self) -> tuple[dict[str, float], dict[str, float]]:
        """(module -> max |input|, module -> max |output|) over the batches seen; one device sync."""
        inputs = {name: float(self._input_max[leader]) for name, leader in self.leader.items()
                  if leader in self._input_max}
        return inputs, {name: float(value) for name, value in self._output_max.items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._seen = []


def _running_max(maxima: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> None:
    """maxima[name] = max(maxima[name], max |x|), kept on x's device (no sync per batch)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
        return
    largest = x.detach().abs().amax().float()
    maxima[name] = largest if name not in maxima else torch.maximum(maxima[name], largest)


def activations_on_device(activation_bytes: int, device_type: str, free_device_bytes: int) -> bool:
    """Whether the calibration activations (every sample's layer inputs) stay on the device between layers
    instead of going to the host and back every layer: on CUDA, when they take at most DEVICE_ACTIVATIONS_SHARE
    of the device's free memory (the rest holds a layer, its H sums and one batch's temporaries)."""
    return device_type == "cuda" and activation_bytes <= DEVICE_ACTIVATIONS_SHARE * free_device_bytes


def free_device_bytes(device: torch.device) -> int:
    """Free memory of a CUDA device (0 elsewhere: the host is the device)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0


def activation_bytes(batches: list[CalibrationBatch], hidden_size: int, dtype: torch.dtype) -> int:
    """Bytes of every batch's hidden states (padded positions x hidden_size) in dtype."""
    return position_count(batches) * hidden_size * torch.empty(0, dtype=dtype).element_size()


def calibration_dtype(name: str, stored: torch.dtype | None, device: torch.device) -> torch.dtype:
    """--calib-dtype as a dtype. auto: the checkpoint's own bfloat16 (config.json's dtype) where the device
    computes it fast (CUDA GPUs with bf16; CPUs with AMX-BF16 tiles, where SmolLM2's forward is 2.5x float32's),
    else float32. A half-precision choice needs weights stored in it (checked as each layer is read)."""
    if name != "auto":
        return getattr(torch, name)
    return torch.bfloat16 if stored == torch.bfloat16 and fast_bfloat16(device) else torch.float32


def fast_bfloat16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()  # {} where this torch cannot say
    return device.type == "cpu" and bool(capabilities.get("amx_bf16"))
