"""The conversion loop: stream a causal LM layer by layer into a QuAILoRA bundle.

source -> meta skeleton -> calibration batches -> the model front on every batch (layer 0's
inputs and every layer's call arguments) -> per decoder layer (LayerConverter): materialise,
full-precision forward with H hooks, quantize, solve, write -> configs, tokenizer, report, card ->
the bundle renamed into place. Never more than one decoder layer's full-precision weights are
materialised; calibration activations live on the CPU.
"""
from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import ContextManager

import torch
from torch import nn

from ..bundle.configs import adapter_config, quantized_config
from ..bundle.layout import ADAPTER_CONFIG, CONFIG, COPIED_FROM_SOURCE, REPORT, config_dtype, read_config
from ..bundle.writer import BundleWriter
from ..calibration import self_generated
from ..calibration.batches import CalibrationBatch, make_batches, pad_token_id, sample_token_sequences
from ..calibration.texts import read_texts
from ..core.lora import peft_target_modules
from ..core.quantize import Quantizer, quantizer_for
from ..events import Calibrated, ConversionDone, LayerConverted, Listener, SourceResolved, Status, TextGenerated, ignore
from ..model_card import render_model_card
from ..sources.checkpoint import CheckpointReader, KeyMap, transformers_renaming
from ..sources.resolve import ModelSource, open_model
from .architectures import find_decoder_layers, layer_targets, linear_modules
from .capture import capture_layer_calls
from .layer import LayerConverter
from .report import conversion_report
from .settings import ConvertSettings, resolve_device
from .skeleton import build_skeleton, front_materialized


def convert(settings: ConvertSettings, on_event: Listener = ignore, *, opened: ModelSource | None = None) -> Path:
    """Convert settings.model into a bundle at settings.out; returns the bundle's path.

    opened: settings.model already opened (open_source; its temporary folders stay the caller's to
    remove), e.g. to share one dequantized GGUF copy between convert and a following evaluate.
    """
    settings.validate()
    device = resolve_device(settings.device)
    quantizer = quantizer_for(settings.bits)
    with ExitStack() as stack:
        source = opened if opened is not None else stack.enter_context(open_source(settings, on_event))
        started = time.perf_counter() - source.open_seconds  # opening the source counts, whoever opened it
        on_event(SourceResolved(source.folder, source.repo_id, source.commit, source.gguf))
        out, report = _convert(settings, source, quantizer, device, on_event, started)
    on_event(ConversionDone(out, report))
    return out


def open_source(settings: ConvertSettings, on_event: Listener = ignore) -> ContextManager[ModelSource]:
    """settings.model opened as convert() opens it: for a caller that shares it with a later evaluate()."""
    return open_model(settings.model, settings.revision, settings.allow_pickle, settings.trust_remote_code,
                      lambda message: on_event(Status(message)))


def _convert(settings: ConvertSettings, source: ModelSource, quantizer: Quantizer, device: torch.device,
             on_event: Listener, started: float) -> tuple[Path, dict]:
    model, tokenizer = build_skeleton(source.folder, device, settings.trust_remote_code)
    layers_path, layers = find_decoder_layers(model)
    targets = layer_targets(layers, layers_path, settings.target_modules)
    reader = CheckpointReader(source.folder)
    key_map = KeyMap(list(model.state_dict()), reader.keys(), model.base_model_prefix, transformers_renaming(model))
    batches = _calibration_batches(settings, tokenizer, source.folder, device, on_event)

    with BundleWriter(settings.out, settings.overwrite, settings.max_shard_bytes) as writer:  # fails early if --out exists
        on_event(Status("capturing calibration activations"))
        with front_materialized(model, layers_path, reader, key_map, device):
            hidden, calls = capture_layer_calls(model, layers, batches, device)
        calibration_seconds = time.perf_counter() - started
        on_event(Calibrated(sum(len(b.input_ids) for b in batches), calibration_seconds))

        _copy_outside_layers(writer, reader, key_map, layers_path)
        converter = LayerConverter(settings, quantizer, reader, key_map, writer, batches, device)
        modules, layer_seconds = [], []
        for index, layer in enumerate(layers):
            layer_started = time.perf_counter()
            modules += converter.convert(f"{layers_path}.{index}.", layer, targets[index], hidden, calls[index])
            layer_seconds.append(time.perf_counter() - layer_started)
            on_event(LayerConverted(index, len(layers), layer_seconds[-1]))

        _write_configs(writer, settings, source, quantizer, converter.stored_dtypes, model, layers_path, targets)
        dropped = sorted(set(reader.keys()) - set(key_map.to_model))
        report = conversion_report(settings, source, quantizer, modules, batches, calibration_seconds, layer_seconds,
                                   started, dropped)
        writer.write_json(REPORT, report)
        render_model_card(writer.tmp, report=report, source_folder=source.folder, model_id=str(settings.out),
                          allow_download=source.repo_id is not None)  # README.md, the Hub model card
        return writer.finish(), report


def _calibration_batches(s: ConvertSettings, tokenizer, folder: Path, device: torch.device,
                         on_event: Listener) -> list[CalibrationBatch]:
    if s.calib == self_generated.SELF:  # data-free: the full-precision model samples its own text
        on_event(Status("generating calibration text with the model (--calib self)"))
        texts = self_generated.generate_texts(folder, s.num_samples, s.seq_len, s.seed, device=device, on_progress=(
            lambda done, total: on_event(TextGenerated(done, total))))
    else:
        # Hub sources: a seeded selection of 2x --num-samples records (spares for ones that tokenize to nothing)
        texts = read_texts(s.calib, s.calib_split, s.calib_field, max_records=2 * s.num_samples, seed=s.seed)
    sequences = sample_token_sequences(texts, tokenizer, s.num_samples, s.seq_len, s.seed)
    return make_batches(sequences, s.batch_size, pad_token_id(tokenizer))


def _copy_outside_layers(writer: BundleWriter, reader: CheckpointReader, key_map: KeyMap, layers_path: str) -> None:
    """Embeddings, final norm, output head: copied as stored."""
    for key in reader.keys():
        name = key_map.model_key(key)
        if not name.startswith(layers_path + ".") and key in key_map.to_model:
            writer.add_base_tensor(name, reader.get(key))
    reader.release()


def _write_configs(writer: BundleWriter, s: ConvertSettings, source: ModelSource, quantizer: Quantizer,
                   stored_dtypes: set[torch.dtype], model: nn.Module, layers_path: str,
                   targets: list[dict[str, nn.Module]]) -> None:
    """config.json with quantization_config, adapter_config.json, and the source's tokenizer files."""
    source_config = read_config(source.folder)  # the original text, untouched but for quantization_config
    compute_dtype = config_dtype(source_config) or (next(iter(stored_dtypes)) if len(stored_dtypes) == 1 else torch.float32)
    linears = list(linear_modules(model))
    decoder_linears = {n for n in linears if n.startswith(layers_path + ".")}
    skip = [n for n in linears if n not in decoder_linears]  # left in full precision
    writer.write_json(CONFIG, quantized_config(source_config, quantizer.loader_options(compute_dtype), skip))
    targeted = {f"{layers_path}.{i}.{n}" for i, chosen in enumerate(targets) for n in chosen}
    writer.write_json(ADAPTER_CONFIG, adapter_config(
        str(writer.out), peft_target_modules(targeted, decoder_linears), s.rank, s.lora_alpha, s.use_rslora))
    writer.copy_files(source.folder, COPIED_FROM_SOURCE)
