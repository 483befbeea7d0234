"""What a conversion will cost, before it runs: sizes from the config, memory and time from a probe.

Sizes (bundle, work folder) follow from the meta skeleton's shapes and the quantizer's storage
formula. Memory and time come from converting ONE decoder layer with random weights on the real
device, on one calibration batch, fed through the model front (inputs_embeds: no weight is read):
its peak working set, its forward time (scaled by the batch count) and its quantize + solve time
(scaled by the layer count). What the probe cannot see is added from shapes: the activations of
every calibration sample kept on the host, the layer's checkpoint pages, the process's own size.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..bundle.layout import COPIED_FROM_SOURCE, config_dtype, read_config
from ..bundle.writer import BASE_HEADER_BYTES
from ..calibration.batches import CalibrationBatch, position_count, sample_count, token_count
from ..core.lora import lora_scaling, to_peft
from ..core.quantize import Quantizer
from .architectures import linear_modules, select_targets, weight_matrix
from .capture import (CALIBRATION_DTYPE, accumulate_hessians, activations_on_device, calibration_dtype,
                      capture_layer_calls, free_device_bytes)
from .layer import GroupFactors, compensate
from .prefetch import reads_ahead
from .report import module_report
from .settings import ConvertSettings

DISK_BYTES_PER_SECOND = 1 << 30  # assumed (not measured: a plan writes nothing) for reading weights, writing checkpoints
FIXED_SECONDS = 2.0  # configs, tokenizer, report and card, renaming into place


@dataclass
class Plan:
    layers: int
    targeted_modules: int
    parameters: int
    calibration_samples: int
    calibration_tokens: int
    bundle_bytes: int
    work_bytes: int
    peak_host_bytes: int
    peak_device_bytes: int  # 0 when the device is the host
    seconds: float
    activations_on: str = "host"  # where every sample's layer inputs wait between layers: host or device

    @property
    def disk_bytes(self) -> int:
        return self.bundle_bytes + self.work_bytes

    def as_json(self) -> dict:
        return {**asdict(self), "disk_bytes": self.disk_bytes}


def bundle_bytes(model: nn.Module, layers_path: str, quantizer: Quantizer, shapes: dict[str, tuple[int, int]],
                 rank: int, stored_dtype: torch.dtype, source_folder: Path, max_shard_bytes: int) -> int:
    """Bytes of the bundle: quantized decoder linears, everything else as stored, adapter, headers, side files."""
    itemsize = torch.empty(0, dtype=stored_dtype).element_size()
    linear_weights = {f"{n}.weight": m for n, m in linear_modules(model).items() if n.startswith(layers_path + ".")}
    total = 0
    for name, param in _stored_parameters(model):
        module = linear_weights.get(name)
        total += quantizer.stored_bytes(*weight_matrix(module).shape) if module is not None else param.numel() * itemsize
    total += sum(4 * min(rank, out, inp) * (out + inp) for out, inp in shapes.values())  # float32 lora_A, lora_B
    total += BASE_HEADER_BYTES * (1 + total // max_shard_bytes) + 200 * len(shapes)
    return total + sum(p.stat().st_size for p in _side_files(source_folder)) + (64 << 10)  # configs, report, card


def _stored_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters a checkpoint stores: a tied output head (the meta skeleton does not tie it) is not one."""
    head = model.get_output_embeddings()
    tied = getattr(model.config, "tie_word_embeddings", False) and head is not None
    return [(n, p) for n, p in model.named_parameters() if not (tied and p is head.weight)]


def work_bytes(padded_tokens: int, hidden_size: int) -> int:
    """The work folder beside the bundle: token ids and masks, and two generations of activations (a commit)."""
    return 16 * padded_tokens + 2 * 4 * padded_tokens * hidden_size


def stored_dtype_of(folder: Path) -> torch.dtype:
    return config_dtype(read_config(folder)) or torch.float32


def make_plan(s: ConvertSettings, model: nn.Module, layers_path: str, layers: nn.ModuleList, shapes: dict,
              batches: list[CalibrationBatch], quantizer: Quantizer, device: torch.device, source_folder: Path,
              process_started: float) -> Plan:
    stored_dtype = stored_dtype_of(source_folder)
    calib_dtype = calibration_dtype(s.calib_dtype, stored_dtype, device)
    itemsize = torch.empty(0, dtype=stored_dtype).element_size()
    hidden_size = model.config.hidden_size
    padded = position_count(batches)
    probed = padded / batches[0].input_ids.numel()  # the probe's batch scaled to every padded position
    activations = torch.empty(0, dtype=calib_dtype).element_size() * padded * hidden_size  # every sample, on the host
    layer_params = sum(p.numel() for p in layers[0].parameters())
    head = model.get_output_embeddings()  # never run by the front, so never materialised
    front_params = sum(p.numel() for n, p in model.named_parameters()
                       if not n.startswith(layers_path + ".") and (head is None or p is not head.weight))
    bundle = bundle_bytes(model, layers_path, quantizer, shapes, s.rank, stored_dtype, source_folder, s.max_shard_bytes)
    baseline = _rss()
    probe = probe_layer(s, model, layers, batches[0], quantizer, device, stored_dtype, calib_dtype)
    on_host = device.type != "cuda"
    kept_on_device = activations_on_device(activations, device.type, free_device_bytes(device))  # as pipeline decides
    device_activations = activations if kept_on_device else 0
    host_activations = activations - device_activations
    # a layer as stored in the shard maps, and on accelerators the next one read ahead (convert.prefetch)
    stored_layers = 2 if reads_ahead(device) else 1
    host_layer_phase = (baseline + host_activations + stored_layers * layer_params * itemsize
                        + (probe["host_bytes"] if on_host else 0))
    host_front_phase = baseline + host_activations + front_params * (itemsize + (4 if on_host else 0))
    largest_batch = max(b.input_ids.numel() for b in batches) * hidden_size * 4
    device_front_phase = front_params * 4 + 2 * largest_batch  # the front in float32, one batch in and out
    io_bytes = len(layers) * (layer_params * itemsize + activations) + bundle  # reads, checkpoints, the bundle
    startup = time.time() - process_started  # imports, skeleton, calibration: the real run pays them too
    return Plan(
        layers=len(layers), targeted_modules=len(shapes), parameters=sum(p.numel() for _, p in _stored_parameters(model)),
        calibration_samples=sample_count(batches),
        calibration_tokens=token_count(batches),
        bundle_bytes=bundle, work_bytes=work_bytes(padded, hidden_size),
        peak_host_bytes=int(max(host_layer_phase, host_front_phase)),
        peak_device_bytes=0 if on_host else int(max(probe["device_bytes"], device_front_phase) + device_activations),
        seconds=(startup + probe["front_seconds"] * probed + FIXED_SECONDS + io_bytes / DISK_BYTES_PER_SECOND
                 + len(layers) * (probe["forward_seconds"] * probed + probe["solve_seconds"])),
        activations_on="device" if kept_on_device else "host",
    )


def probe_layer(s: ConvertSettings, model: nn.Module, layers: nn.ModuleList, batch: CalibrationBatch,
                quantizer: Quantizer, device: torch.device, stored_dtype: torch.dtype,
                calib_dtype: torch.dtype = CALIBRATION_DTYPE) -> dict:
    """Convert a random copy of layer 0 on one batch: seconds and peak bytes of each part of the real loop."""
    front = _random_front(model, layers, device, calib_dtype)
    embed = _random_embedding(model.config.hidden_size, device, calib_dtype)
    baseline = _reset_peaks(device)
    started = time.perf_counter()
    hidden, calls = capture_layer_calls(model, layers, [batch], device, embed=embed, dtype=calib_dtype)
    front_seconds = time.perf_counter() - started
    layer = _random_copy(layers[0], device, calib_dtype)
    targets = select_targets(layer, s.target_modules)
    accumulate_hessians(layer, targets, list(hidden), calls[0], [batch], device, dtype=calib_dtype)  # warm-up
    started = time.perf_counter()
    hessians = accumulate_hessians(layer, targets, hidden, calls[0], [batch], device, dtype=calib_dtype)
    forward_seconds = time.perf_counter() - started
    started = time.perf_counter()
    groups: dict[str, GroupFactors] = {}  # shared per input group, as in the real loop
    for name, module in linear_modules(layer).items():
        W = weight_matrix(module).detach()
        if name in targets and name in hessians.leader:
            leader = hessians.leader[name]
            group = groups.setdefault(leader, GroupFactors(hessians.mean(name), s.damp, s.gptq_damp))
            result = compensate(s, quantizer, W, stored_dtype, group)
            to_peft(result.correction, lora_scaling(s.lora_alpha, s.rank, s.use_rslora), s.lora_split)
            module_report(name, name, result, group.H, s.report_baseline)  # the report's products
        else:
            quantizer.quantize(W.to(stored_dtype))
    solve_seconds = time.perf_counter() - started
    host_bytes, device_bytes = _peaks(device, baseline)
    del layer, hessians, hidden, calls, front
    return dict(front_seconds=front_seconds, forward_seconds=forward_seconds, solve_seconds=solve_seconds,
                host_bytes=host_bytes, device_bytes=device_bytes)


def _random_front(model: nn.Module, layers: nn.ModuleList, device: torch.device, dtype: torch.dtype) -> list:
    """Random values for the small parameters the front runs besides the embedding (absolute positions, norms)."""
    in_layers = {id(p) for p in layers.parameters()}
    skipped = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    kept = []
    for name, param in list(model.named_parameters()):
        if id(param) in in_layers or id(param) in skipped:
            continue
        owner, _, leaf = name.rpartition(".")
        value = nn.Parameter(torch.randn(param.shape, device=device, dtype=dtype) * 0.02, requires_grad=False)
        setattr(model.get_submodule(owner), leaf, value)
        kept.append(value)
    return kept


def _random_embedding(hidden_size: int, device: torch.device, dtype: torch.dtype):
    def embed(ids: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device=device).manual_seed(0)
        return torch.randn(*ids.shape, hidden_size, device=device, dtype=dtype, generator=generator)
    return embed


def _random_copy(layer: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    copied = copy.deepcopy(layer).to_empty(device=device).to(dtype)
    with torch.no_grad():
        for param in copied.parameters():
            param.normal_(0.0, 0.02) if param.dim() > 1 else param.fill_(1.0)
    return copied


def _side_files(folder: Path) -> list[Path]:
    import fnmatch

    return [p for p in Path(folder).iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, x) for x in COPIED_FROM_SOURCE)]


def _rss() -> int:
    return _status("VmRSS")


def _status(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peaks(device: torch.device) -> int:
    """Start measuring peaks from here; returns the current RSS (the host baseline)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM starts again from the current RSS
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return _rss()


def _peaks(device: torch.device, baseline: int) -> tuple[int, int]:
    """(host bytes above baseline, the RSS _reset_peaks returned; peak device bytes allocated)."""
    host = max(0, _status("VmHWM") - baseline)
    on_device = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return host, on_device


def process_start_time() -> float:
    """When this process started (epoch seconds), from /proc; now if unknown."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return time.time()
