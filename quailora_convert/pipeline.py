"""The conversion loop: stream a causal LM layer by layer into a QuAILoRA bundle.

Never more than one decoder layer's full-precision weights are materialised; calibration
activations live on the CPU; quantized shards and adapter tensors are written as each layer
finishes.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import __version__, architectures, calibration, capture, checkpoint, memory, self_calibration, solvers
from .adapter import adapter_config, adapter_key, peft_target_modules
from .bundle import REPORT_NAME, BundleWriter
from .errors import BadInputError
from .hub import TOKENIZER_PATTERNS, ModelSource, resolve_model
from .model_card import render_model_card
from .quantize import Quantizer, quantizer_for

log = logging.getLogger(__name__)
CALIBRATION_DTYPE = torch.float32  # the paper's X comes from the full-precision model


@dataclass
class ConvertSettings:
    model: str
    out: Path
    calib: str
    calib_split: str | None = None  # Hub datasets: the split (None: train)
    calib_field: str | None = None  # Hub datasets: the text column (None: Alpaca columns or 'text')
    bits: int = 4
    rank: int = 64
    lora_alpha: float = 16.0
    use_rslora: bool = False
    solver: str = "exact"
    als_steps: int = 20
    damp: float = solvers.DEFAULT_DAMP
    target_modules: str | list[str] = "all-linear"
    num_samples: int = 128
    seq_len: int = 512
    batch_size: int = 8
    device: str = "auto"
    seed: int = 0
    revision: str | None = None
    overwrite: bool = False
    allow_pickle: bool = False  # pytorch_model*.bin sources: unpickling can run code
    trust_remote_code: bool = False  # models whose config.json names custom code (auto_map)
    max_shard_bytes: int = 1 << 30


@dataclass
class Event:
    """Progress emitted by convert(): kind is 'resolved', 'calibrated', 'layer' or 'done'; also 'status'
    (a phase starts: data['message']) and 'generated' (--calib self: data['done'] of data['total'] samples)."""

    kind: str
    data: dict = field(default_factory=dict)


@dataclass
class ModuleReport:
    module: str
    shape: tuple[int, int]  # (out, in)
    input_group: str  # the module whose input H was accumulated on (q/k/v share one)
    error_before: float  # ||E X||^2 / n
    error_svd_init: float  # with the rank-r SVD of E (weight-space init)
    error_after: float  # with the solver's correction
    damped_eigenvalues: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise BadInputError(f"--device {name!r} is not a device (auto, cpu, cuda:0, ...)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"--device {name}: no CUDA device is available; use --device cpu")
    return device


def convert(settings: ConvertSettings, on_event: Callable[[Event], None] = lambda e: None) -> Path:
    _validate(settings)
    memory.serve_large_blocks_from_mmap()  # peak RSS must not grow with the number of layers
    started = time.perf_counter()
    device = resolve_device(settings.device)
    quantizer = quantizer_for(settings.bits)
    if Path(settings.model).suffix.lower() == ".gguf":
        on_event(Event("status", {"message": "dequantizing the GGUF file (read in full, not streamed)"}))
    source = resolve_model(settings.model, settings.revision, settings.allow_pickle, settings.trust_remote_code)
    on_event(Event("resolved", {"folder": str(source.folder), "repo_id": source.repo_id, "commit": source.commit,
                                "gguf": source.gguf}))

    model, tokenizer = _skeleton(source.folder, device, settings.trust_remote_code)
    layers_path, layers = architectures.find_decoder_layers(model)
    targets = _targets(layers, layers_path, settings.target_modules)
    reader = checkpoint.CheckpointReader(source.folder)
    key_map = checkpoint.KeyMap(list(model.state_dict()), reader.keys(), model.base_model_prefix,
                                 checkpoint.transformers_renaming(model))
    batches = _calibration_batches(settings, tokenizer, source.folder, device, on_event)

    writer = BundleWriter(settings.out, settings.overwrite, settings.max_shard_bytes)  # fails early if --out exists
    try:
        on_event(Event("status", {"message": "capturing calibration activations"}))
        front = _materialize_front(model, layers_path, reader, key_map, device)
        hidden, calls = capture.capture_layer_calls(model, layers, batches, device, CALIBRATION_DTYPE)
        for name in front:
            checkpoint.release(model.get_submodule(name))
        calibration_seconds = time.perf_counter() - started
        samples = sum(len(b.input_ids) for b in batches)
        on_event(Event("calibrated", {"samples": samples, "seconds": calibration_seconds}))

        _copy_outside_layers(writer, reader, key_map, layers_path)
        reports, layer_seconds, stored_dtypes = [], [], set()
        for index, layer in enumerate(layers):
            layer_started = time.perf_counter()
            prefix = f"{layers_path}.{index}."
            stored = checkpoint.materialize(layer, prefix, reader, key_map, device, CALIBRATION_DTYPE)
            stored_dtypes.update(stored.values())
            hessians, groups = _run_layer(layer, targets[index], hidden, calls[index], batches, device)
            reports += _quantize_layer(layer, prefix, stored, targets[index], hessians, groups, quantizer, settings, writer)
            _copy_layer_extras(layer, prefix, reader, key_map, writer)
            checkpoint.release(layer)
            reader.release()
            del hessians
            layer_seconds.append(time.perf_counter() - layer_started)
            on_event(Event("layer", {"index": index, "count": len(layers), "seconds": layer_seconds[-1]}))

        skip = [n for n in architectures.linear_modules(model) if not n.startswith(layers_path + ".")]
        compute_dtype = _compute_dtype(source.folder, stored_dtypes)
        _write_configs(writer, source, quantizer, compute_dtype, skip, settings, targets, layers_path, model)
        writer.copy_files(source.folder, TOKENIZER_PATTERNS)
        report = _report(settings, source, quantizer, reports, batches, calibration_seconds, layer_seconds, started)
        report["dropped_checkpoint_keys"] = sorted(set(reader.keys()) - set(key_map.to_model))
        writer.write_json(REPORT_NAME, report)
        render_model_card(writer.tmp, report=report, source_folder=source.folder, model_id=str(settings.out),
                          allow_download=source.repo_id is not None)  # README.md, the Hub model card
        out = writer.finish()
    except BaseException:
        writer.abort()
        raise
    on_event(Event("done", {"out": str(out), "report": report}))
    return out


def _validate(s: ConvertSettings) -> None:
    if s.solver not in solvers.SOLVERS:
        raise BadInputError(f"--solver {s.solver!r}: choose one of {', '.join(solvers.SOLVERS)}")
    if s.rank < 1:
        raise BadInputError(f"--rank must be >= 1, got {s.rank}")
    if not s.lora_alpha > 0:
        raise BadInputError(f"--lora-alpha must be positive, got {s.lora_alpha}")
    if s.batch_size < 1 or s.als_steps < 0:
        raise BadInputError("--batch-size must be >= 1 and --als-steps >= 0")
    if s.bits not in (4, 8):
        raise BadInputError(f"--bits must be 4 (NF4) or 8 (int8), got {s.bits}")


def _skeleton(folder: Path, device: torch.device, trust_remote_code: bool) -> tuple[nn.Module, object]:
    """The model built on the meta device from config.json; buffers (rotary tables) are real.

    Attention is transformers' default: SDPA where the architecture supports it, else eager
    (Gemma 2's soft-capped attention has no SDPA path).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _check_remote_code(folder, trust_remote_code)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=CALIBRATION_DTYPE, trust_remote_code=trust_remote_code)
    model.eval()
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            module._buffers[name] = buffer.to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return model, tokenizer


def _check_remote_code(folder: Path, trust_remote_code: bool) -> None:
    """Custom modeling code (config.json's auto_map) runs only when the user says so."""
    auto_map = json.loads((Path(folder) / "config.json").read_text()).get("auto_map") or {}
    if "AutoModelForCausalLM" in auto_map and not trust_remote_code:
        raise BadInputError(f"this model runs its own code ({auto_map['AutoModelForCausalLM']}); read it, then pass "
                            "--trust-remote-code to allow it")


def _targets(layers: nn.ModuleList, layers_path: str, target_modules) -> list[dict[str, nn.Module]]:
    targets = []
    for index, layer in enumerate(layers):
        architectures.check_supported(layer, f"{layers_path}.{index}")
        targets.append(architectures.select_targets(layer, target_modules))
    if not any(targets):
        available = ", ".join(sorted(architectures.linear_modules(layers[0])))
        raise BadInputError(f"--target-modules {','.join(target_modules)} matches no linear; a layer has: {available}")
    return targets


def _calibration_batches(s: ConvertSettings, tokenizer, folder: Path, device, on_event) -> list[calibration.CalibrationBatch]:
    if s.calib == self_calibration.SELF:  # data-free: the full-precision model samples its own text
        on_event(Event("status", {"message": "generating calibration text with the model (--calib self)"}))
        texts = self_calibration.generate_texts(folder, s.num_samples, s.seq_len, s.seed, device=device, on_progress=(
            lambda done, total: on_event(Event("generated", {"done": done, "total": total}))))
    else:
        # Hub sources: a seeded selection of 2x --num-samples records (spares for ones that tokenize to nothing)
        texts = calibration.read_texts(s.calib, s.calib_split, s.calib_field, max_records=2 * s.num_samples, seed=s.seed)
    sequences = calibration.sample_token_sequences(texts, tokenizer, s.num_samples, s.seq_len, s.seed)
    pad_id = calibration.pad_token_id(tokenizer)
    return calibration.make_batches(sequences, s.batch_size, pad_id)


def _materialize_front(model: nn.Module, layers_path: str, reader, key_map, device) -> list[str]:
    """Load every parameter outside the decoder layers except the output head (never run)."""
    head = model.get_output_embeddings()
    head_weight = id(head.weight) if head is not None else None
    owners = set()
    for name, param in model.named_parameters():
        if name.startswith(layers_path + ".") or id(param) == head_weight:
            continue
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        tensor = reader.get(key_map.checkpoint_key(name))
        setattr(module, leaf, nn.Parameter(tensor.to(device, CALIBRATION_DTYPE), requires_grad=False))
        owners.add(owner)
    return sorted(owners)


def _copy_outside_layers(writer: BundleWriter, reader, key_map, layers_path: str) -> None:
    for key in reader.keys():
        name = key_map.model_key(key)
        if not name.startswith(layers_path + ".") and key in key_map.to_model:
            writer.add_base_tensor(name, reader.get(key))
    reader.release()


def _run_layer(layer, targets, hidden, calls, batches, device):
    """Full-precision forward of every batch through one layer: accumulates H, advances hidden."""
    hooks = capture.HessianHooks(targets, device)
    try:
        with torch.no_grad():
            for b, batch in enumerate(batches):
                moved: dict[int, torch.Tensor] = {}
                kwargs = capture.cast_floating(capture.to_device(calls[b].kwargs, device, moved), CALIBRATION_DTYPE)
                hooks.start_batch(batch.token_mask.to(device))
                output = layer(hidden[b].to(device), **kwargs)
                output = output[0] if isinstance(output, (tuple, list)) else output
                hidden[b] = output.to("cpu", CALIBRATION_DTYPE)
    finally:
        hooks.remove()
    return hooks.sums, hooks.leader


def _quantize_layer(layer, prefix, stored, targets, hessians, groups, quantizer: Quantizer, s: ConvertSettings,
                    writer: BundleWriter) -> list[ModuleReport]:
    scaling = solvers.lora_scaling(s.lora_alpha, s.rank, s.use_rslora)
    reports = []
    for name, module in architectures.linear_modules(layer).items():
        W = architectures.weight_matrix(module).detach()  # (out, in) float32, exact copy of the stored values
        quantized = quantizer.quantize(W.to(stored[f"{name}.weight"]))
        for suffix, tensor in quantized.tensors.items():
            writer.add_base_tensor(f"{prefix}{name}.{suffix}", tensor)
        if name not in targets:
            continue
        if name not in groups:
            raise RuntimeError(f"{prefix}{name} was never called during calibration; exclude it with --target-modules")
        E = W.float() - quantized.dequantized.float()  # (out, in)
        H = hessians[groups[name]].mean()  # (in, in)
        rank = min(s.rank, *E.shape)
        try:
            correction = solvers.solve(E, H, rank, s.solver, s.als_steps, s.damp)
        except FloatingPointError as e:
            raise FloatingPointError(f"{prefix}{name}: {e}") from e
        lora_A, lora_B = solvers.to_peft(correction, scaling)
        writer.add_adapter_tensor(adapter_key(f"{prefix}{name}", "lora_A"), lora_A)
        writer.add_adapter_tensor(adapter_key(f"{prefix}{name}", "lora_B"), lora_B)
        reports.append(ModuleReport(
            module=f"{prefix}{name}", shape=tuple(E.shape), input_group=f"{prefix}{groups[name]}",
            error_before=solvers.calibrated_error(E, H),
            error_svd_init=solvers.calibrated_error(E.double() - solvers.svd_init(E, rank).matrix(), H),
            error_after=solvers.calibrated_error(E.double() - correction.matrix(), H),
            damped_eigenvalues=correction.damped,
        ))
    return reports


def _copy_layer_extras(layer, prefix, reader, key_map, writer: BundleWriter) -> None:
    """Norms, biases and persistent buffers of a layer, copied as stored."""
    quantized = {f"{prefix}{name}.weight" for name in architectures.linear_modules(layer)}
    for name in layer.state_dict():
        key = f"{prefix}{name}"
        if key not in quantized and key in key_map.to_checkpoint:
            writer.add_base_tensor(key, reader.get(key_map.to_checkpoint[key]))


def _compute_dtype(folder: Path, stored: set[torch.dtype]) -> torch.dtype:
    config = json.loads((folder / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    return next(iter(stored)) if len(stored) == 1 else torch.float32


def _write_configs(writer, source: ModelSource, quantizer, compute_dtype, skip_modules, s: ConvertSettings, targets,
                   layers_path, model) -> None:
    config = json.loads((source.folder / "config.json").read_text())  # the original text, untouched
    quantization = quantizer.quantization_config(compute_dtype)
    quantization["llm_int8_skip_modules"] = skip_modules or None
    config["quantization_config"] = quantization
    writer.write_json("config.json", config)
    targeted = {f"{layers_path}.{i}.{n}" for i, t in enumerate(targets) for n in t}
    linears = {n for n in architectures.linear_modules(model) if n.startswith(layers_path + ".")}
    writer.write_json("adapter_config.json", adapter_config(
        str(writer.out), peft_target_modules(targeted, linears), s.rank, s.lora_alpha, s.use_rslora))


def _report(s: ConvertSettings, source: ModelSource, quantizer, reports, batches, calibration_seconds, layer_seconds,
            started) -> dict:
    import bitsandbytes
    import peft
    import transformers

    before = sum(r.error_before for r in reports)
    after = sum(r.error_after for r in reports)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()}
    return {
        "quailora_convert": __version__,
        "source": {"model": s.model, "repo_id": source.repo_id, "commit": source.commit, "gguf": source.gguf},
        "quantization": {"bits": quantizer.bits, "type": quantizer.name},
        "settings": settings,
        "calibration": {"samples": sum(len(b.input_ids) for b in batches),
                        "tokens": int(sum(int(b.attention_mask.sum()) for b in batches))},
        "summary": {"modules": len(reports), "error_before": before, "error_after": after,
                    "relative_error_after": after / before if before else None},
        "modules": [asdict(r) for r in reports],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "bitsandbytes": bitsandbytes.__version__, "peft": peft.__version__},
        "timings": {"calibration_seconds": calibration_seconds, "layer_seconds": layer_seconds,
                    "total_seconds": time.perf_counter() - started},
        "peak_rss_bytes": _peak_rss_bytes(),
    }


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
