"""The conversion loop: stream a causal LM layer by layer into a QuAILoRA bundle, resumably.

--out locked (work folder) -> source -> meta skeleton -> calibration batches -> the model front on
every batch (every layer's call arguments) -> per decoder layer (LayerConverter): materialise,
full-precision forward with H hooks, quantize, solve, write -> a resume point -> configs, tokenizer,
report, card -> the bundle renamed into place. Never more than one decoder layer's full-precision
weights are materialised; calibration activations live on the CPU. Under torchrun every rank runs this
loop on its share of the batches and rank 0 alone writes (convert.ranks).
"""
from __future__ import annotations

import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ContextManager

import torch
from torch import nn

from ..bundle.configs import adapter_config, quantized_config
from ..bundle.layout import (INIT_ADAPTER_CONFIG, CONFIG, COPIED_FROM_SOURCE, REPORT, SAFETENSORS_INDEX,
                             SAFETENSORS_SINGLE, config_dtype, read_config)
from ..bundle.safetensors_stream import disk_full_named, header_bytes_for
from ..bundle.writer import BundleWriter
from ..calibration import self_generated
from ..calibration.batches import (CalibrationBatch, longest_first, make_batches, pad_token_id, sample_count,
                                   sample_token_sequences, token_count)
from ..calibration.texts import read_texts
from ..core.lora import adapter_key, peft_target_modules, rank_patterns
from ..core.quantize import Quantizer, quantizer_for
from ..errors import BadInputError
from ..events import Calibrated, ConversionDone, LayerConverted, Listener, SourceResolved, Status, TextGenerated, ignore
from ..model_card import render_model_card
from ..sources.checkpoint import CheckpointReader, KeyMap, open_checkpoint
from ..sources.resolve import ModelSource, open_model
from ..stopping import critical
from .allocator import heap_for_forward
from .architectures import find_decoder_layers, layer_targets, linear_modules, weight_matrix
from .capture import activation_bytes, activations_on_device, calibration_dtype, capture_layer_calls, free_device_bytes
from .compute_dtype import BundleValues, bundle_values, choose_compute_dtype
from .host_memory import pinned_scope
from .layer import LayerConverter
from .phases import PhaseTimer
from .prefetch import LayerPrefetch, reads_ahead
from .plan import Plan, make_plan, process_start_time, stored_dtype_of
from .report import ModuleReport, conversion_report
from .settings import ConvertSettings, resolve_device
from .preflight import check_disk, check_rank, clamp_seq_len
from .resume import (check_fingerprint, leave, refuse_existing_out, refuse_overlaps, source_file_layers,
                     take_over)
from .ranks import Ranks, join_ranks
from .skeleton import build_skeleton, front_materialized
from .work_folder import WorkFolder, fingerprint


def convert(settings: ConvertSettings, on_event: Listener = ignore, *, opened: ModelSource | None = None) -> Path:
    """Convert settings.model into a bundle at settings.out; returns the bundle's path.

    opened: settings.model already opened (open_source; its temporary folders stay the caller's to
    remove), e.g. to share one dequantized GGUF copy between convert and a following evaluate.
    Started by torchrun (WORLD_SIZE > 1), every rank calls it and shares the work (convert.ranks); only
    rank 0 writes, and only its on_event hears of progress.
    """
    settings.validate()
    ranks = join_ranks(resolve_device(settings.device))
    try:
        # several ranks: a signal after the last together() is dropped (published); pinned host memory freed
        with ranks.held_signals(), pinned_scope(ranks.device):
            bundle, report = _convert_as(ranks, settings, on_event if ranks.main else ignore, opened)
            ranks.close()
    except BaseException as error:
        ranks.close(error)
        raise
    if ranks.main:  # after the ranks parted: a listener's error cannot leave a peer waiting
        on_event(ConversionDone(bundle, report))
    return bundle


def _convert_as(ranks: Ranks, settings: ConvertSettings, on_event: Listener,
                opened: ModelSource | None) -> tuple[Path, dict]:
    quantizer = quantizer_for(settings.bits)
    work = WorkFolder(settings.out)
    ranks.on_main(lambda: _lock(work, settings))  # one writer per --out, before any read
    try:
        # again under the lock (a run that held it may have just finished), then the state to continue, if any
        state = ranks.main_result(lambda: _take_over(work, settings, on_event))
        with ExitStack() as stack:
            source = ranks.together(lambda: opened if opened is not None
                                    else stack.enter_context(open_source(settings, on_event)))
            started = time.perf_counter() - source.open_seconds  # opening the source counts, whoever opened it
            on_event(SourceResolved(source.folder, source.repo_id, source.commit, source.gguf))
            report = _convert(settings, source, quantizer, ranks, on_event, started, work, state)
        out = ranks.on_main(lambda: work.publish(settings.overwrite), elsewhere=work.out)
    except BaseException as error:
        if ranks.main:
            leave(work, error)
        raise
    return out, report


def _lock(work: WorkFolder, settings: ConvertSettings) -> None:
    refuse_existing_out(settings)
    work.acquire()


def _take_over(work: WorkFolder, settings: ConvertSettings, on_event: Listener) -> dict | None:
    refuse_existing_out(settings)
    return take_over(work, settings, on_event)


def dry_run(settings: ConvertSettings, on_event: Listener = ignore, *, process_started: float | None = None) -> Plan:
    """The plan of convert(settings): reads config, index and calibration, probes one random layer, writes nothing."""
    settings.validate()
    refuse_overlaps(settings)  # what the run would refuse, the plan refuses
    device = resolve_device(settings.device)
    quantizer = quantizer_for(settings.bits)
    with open_source(settings, on_event, metadata_only=True) as source:
        model, tokenizer = build_skeleton(source.folder, device, settings.trust_remote_code)
        settings = clamp_seq_len(settings, model.config, on_event)
        local = source.repo_id is None  # a Hub plan has the index only; pickle weights are converted by the run
        if (source.folder / SAFETENSORS_INDEX).exists() or (local and (source.folder / SAFETENSORS_SINGLE).exists()):
            open_checkpoint(source.folder, model, shards_present=local)
        layers_path, layers = find_decoder_layers(model)
        shapes = _target_shapes(layers_path, layer_targets(layers, layers_path, settings.target_modules))
        check_rank(settings, shapes, on_event)
        if settings.calib == self_generated.SELF:  # generating would run the model: plan for full-length samples
            ids = [[pad_token_id(tokenizer) + 1] * settings.seq_len] * settings.num_samples
            batches = make_batches(ids, settings.batch_size, pad_token_id(tokenizer))
        else:
            batches = _calibration_batches(settings, tokenizer, source.folder, device, on_event)
        on_event(Status("timing one random layer on the device"))
        return make_plan(settings, model, layers_path, layers, shapes, batches, quantizer, device, source.folder,
                         process_started or process_start_time())


def open_source(settings: ConvertSettings, on_event: Listener = ignore,
                metadata_only: bool = False) -> ContextManager[ModelSource]:
    """settings.model opened as convert() opens it: for a caller that shares it with a later evaluate().

    metadata_only: config, index and tokenizer only (a plan): no shard is downloaded or converted.
    """
    return open_model(settings.model, settings.revision, settings.allow_pickle, settings.trust_remote_code,
                      lambda message: on_event(Status(message)), metadata_only=metadata_only)


def _convert(s: ConvertSettings, source: ModelSource, quantizer: Quantizer, ranks: Ranks, on_event: Listener,
             started: float, work: WorkFolder, state: dict | None) -> dict:
    refuse_overlaps(s, source.folder)  # a Hub model's download folder is known now
    device = ranks.device
    dtype = calibration_dtype(s.calib_dtype, stored_dtype_of(source.folder), device)
    model, tokenizer, layers_path, layers, targets, shapes, reader, key_map = ranks.together(
        lambda: _open_skeleton(s, source, device, on_event, dtype))
    s = clamp_seq_len(s, model.config, on_event)  # before the fingerprint: the same command resumes
    prints = fingerprint(asdict(s), source.folder, source.repo_id, source.commit, source.gguf, device)
    prints["calibration_dtype"] = _dtype_name(dtype)  # what auto chose for this checkpoint on this device
    if ranks.size > 1:
        prints["world_size"] = ranks.size  # a rank's share of the batches and activations depends on it

    def calibration() -> list[CalibrationBatch]:  # rank 0: read, or sample and record, the token batches
        if state is not None:
            check_fingerprint(state, prints, work, on_event)
            return work.load_calibration()
        batches = _calibration_batches(s, tokenizer, source.folder, device, on_event)
        if len(batches) < ranks.size:
            raise BadInputError(f"{len(batches)} calibration batches for {ranks.size} processes: every process "
                                "needs one; raise --num-samples or lower --batch-size")
        check_disk(s, model, layers_path, quantizer, shapes, source.folder, batches, work)
        work.save_calibration(batches)
        return batches

    batches = ranks.main_result(calibration)
    mine = [batches[b] for b in ranks.share([b.input_ids.numel() for b in batches])]  # this rank's share

    on_event(Status("capturing calibration activations"))
    timer = PhaseTimer(device, state.get("phase_seconds") if state is not None else None)

    on_device = activations_on_device(activation_bytes(mine, model.config.hidden_size, dtype), device.type,
                                      free_device_bytes(device))  # else each layer's inputs go to the host and back

    def capture():
        with front_materialized(model, layers_path, reader, key_map, device, dtype), timer.phase("forward"), \
                heap_for_forward():
            return capture_layer_calls(model, layers, mine, device, dtype=dtype, keep_on_device=on_device)

    hidden, calls = ranks.together(capture)
    writer = None
    if state is None:
        def start_bundle() -> BundleWriter:
            started_writer = BundleWriter(work.bundle, s.max_shard_bytes, header_bytes_for(
                [adapter_key(p, f) for p in shapes for f in ("lora_A", "lora_B")]))
            _copy_outside_layers(started_writer, reader, key_map, layers_path)
            return started_writer

        writer = ranks.on_main(start_bundle)
        state = {"fingerprint": prints, "layers": len(layers), "next_layer": 0, "reports": [], "stored_dtypes": [],
                 "source_layers": source_file_layers(reader, key_map, layers_path),
                 "layer_seconds": [], "calibration_seconds": time.perf_counter() - started,
                 "ranks": ranks.gather(_share_counts(ranks.rank, mine))}
        _commit(ranks, work, state, writer, hidden, timer)
    else:
        writer = ranks.on_main(lambda: BundleWriter(work.bundle, s.max_shard_bytes, 0, state=state["bundle"]))
        del hidden
        hidden = ranks.together(lambda: work.load_activations(state, ranks.rank, ranks.size))
    on_event(Calibrated(sample_count(batches), state["calibration_seconds"]))

    read_ahead = (LayerPrefetch(source.folder, key_map, pin=device.type == "cuda") if reads_ahead(device)
                  else nullcontext())  # prefetch None: each layer read when it starts
    with read_ahead as prefetch:
        converter = LayerConverter(s, quantizer, reader, key_map, writer, mine, device, timer,
                                   {getattr(torch, name) for name in state["stored_dtypes"]}, ranks, dtype, prefetch)
        _convert_layers(s, ranks, work, state, writer, converter, layers_path, layers, targets, hidden, calls,
                        on_event)
    state["phase_seconds"] = dict(timer.seconds)
    opened = _OpenedModel(model, layers_path, targets, shapes, reader, key_map)
    with disk_full_named(work.bundle):  # configs, tokenizer, report, card (the shards name themselves)
        return ranks.on_main(lambda: _finish(s, source, quantizer, writer, opened, batches, state,
                                             converter.stored_dtypes, started), elsewhere={})


def _convert_layers(s: ConvertSettings, ranks: Ranks, work: WorkFolder, state: dict, writer: BundleWriter | None,
                    converter: LayerConverter, layers_path: str, layers: nn.ModuleList,
                    targets: list[dict[str, nn.Module]], hidden: list[torch.Tensor], calls: list[list],
                    on_event: Listener) -> None:
    """The decoder layers from state["next_layer"] on, each read while the one before it runs; a resume point
    every --resume-interval seconds."""
    committed = time.perf_counter()
    for index in range(state["next_layer"], len(layers)):
        layer_started = time.perf_counter()
        following = (f"{layers_path}.{index + 1}.", layers[index + 1]) if index + 1 < len(layers) else None
        reports = converter.convert(f"{layers_path}.{index}.", layers[index], targets[index], hidden, calls[index],
                                    following)
        state["layer_seconds"].append(time.perf_counter() - layer_started)
        state.update(next_layer=index + 1, reports=state["reports"] + [asdict(r) for r in reports],
                     stored_dtypes=sorted(_dtype_name(d) for d in converter.stored_dtypes))
        last = index + 1 == len(layers)  # the finish follows at once
        if not last and ranks.from_main(time.perf_counter() - committed >= s.resume_interval):
            _commit(ranks, work, state, writer, hidden, converter.timer)
            committed = time.perf_counter()
        on_event(LayerConverted(index, len(layers), state["layer_seconds"][-1]))


def _open_skeleton(s: ConvertSettings, source: ModelSource, device: torch.device, on_event: Listener,
                   dtype: torch.dtype) -> tuple:
    model, tokenizer = build_skeleton(source.folder, device, s.trust_remote_code, dtype)
    layers_path, layers = find_decoder_layers(model)
    targets = layer_targets(layers, layers_path, s.target_modules)
    shapes = _target_shapes(layers_path, targets)
    check_rank(s, shapes, on_event)
    reader, key_map = open_checkpoint(source.folder, model)  # every listed shard and every parameter there
    return model, tokenizer, layers_path, layers, targets, shapes, reader, key_map


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _share_counts(rank: int, batches: list[CalibrationBatch]) -> dict:
    """What one rank calibrates on: its samples and real tokens."""
    return {"rank": rank, "samples": sample_count(batches), "tokens": token_count(batches)}


def _commit(ranks: Ranks, work: WorkFolder, state: dict, writer: BundleWriter | None, hidden: list[torch.Tensor],
            timer: PhaseTimer) -> None:
    """A resume point: every rank's next-layer inputs, then (rank 0) the synced bundle and the state, which
    names them. One critical section: a stop signal that arrives meanwhile takes effect once the state is
    recorded (with several ranks, at together()'s points as always)."""
    with timer.phase("write"), critical():
        ranks.together(lambda: work.save_activations(state["next_layer"], hidden, ranks.rank, ranks.size))

        def record() -> None:
            writer.sync()
            state["phase_seconds"] = dict(timer.seconds)  # every commit records them; this commit's write is not in
            work.record(state, writer.state(), ranks.size)

        ranks.on_main(record)


@dataclass
class _OpenedModel:
    """The skeleton and what the finish reads of it besides the settings."""

    model: nn.Module
    layers_path: str  # "model.layers"
    targets: list[dict[str, nn.Module]]  # per decoder layer: the targeted linears by name
    shapes: dict[str, tuple[int, int]]  # targeted module path -> (out, in)
    reader: CheckpointReader
    key_map: KeyMap


def _finish(s: ConvertSettings, source: ModelSource, quantizer: Quantizer, writer: BundleWriter, opened: _OpenedModel,
            batches: list[CalibrationBatch], state: dict, stored_dtypes: set[torch.dtype], started: float) -> dict:
    """Configs, tokenizer, report and card beside the weights; shards closed and named."""
    quantized = {f"{n}.weight" for n in linear_modules(opened.model) if n.startswith(opened.layers_path + ".")}
    values = bundle_values(state["reports"], opened.reader, opened.key_map, quantized,
                           {f"{path}.weight" for path in opened.shapes})
    _write_configs(writer, s, source, quantizer, stored_dtypes, opened.model, opened.layers_path, opened.targets,
                   opened.shapes, values)
    dropped = sorted(set(opened.reader.keys()) - set(opened.key_map.to_model))
    modules = [ModuleReport(**row) for row in state["reports"]]
    report = conversion_report(s, source, quantizer, modules, batches, state["ranks"],
                               state["fingerprint"]["calibration_dtype"], state["calibration_seconds"],
                               state["layer_seconds"], state.get("phase_seconds", {}), started, dropped,
                               source_fingerprint=state["fingerprint"]["source"])
    writer.write_json(REPORT, report)
    render_model_card(writer.folder, report=report, source_folder=source.folder, model_id=str(s.out),
                      allow_download=source.repo_id is not None)  # README.md, the Hub model card
    writer.close()
    return report


def _target_shapes(layers_path: str, targets: list[dict[str, nn.Module]]) -> dict[str, tuple[int, int]]:
    """(out, in) of every targeted linear by path, read off the meta skeleton."""
    return {f"{layers_path}.{i}.{name}": tuple(weight_matrix(module).shape)
            for i, chosen in enumerate(targets) for name, module in chosen.items()}




def _calibration_batches(s: ConvertSettings, tokenizer, folder: Path, device: torch.device,
                         on_event: Listener) -> list[CalibrationBatch]:
    if s.calib == self_generated.SELF:  # data-free: the full-precision model samples its own text
        on_event(Status("generating calibration text with the model (--calib self)"))
        texts = self_generated.generate_texts(folder, s.num_samples, s.seq_len, s.seed, device=device, on_progress=(
            lambda done, total: on_event(TextGenerated(done, total))))
    else:
        # Hub sources: a seeded selection of 2x --num-samples records (spares for ones that tokenize to nothing)
        texts = read_texts(s.calib, s.calib_split, s.calib_field, max_records=2 * s.num_samples, seed=s.seed)
    sequences = sample_token_sequences(texts, tokenizer, s.num_samples, s.seq_len, s.seed,
                                       source=getattr(texts, "source", None) or f"--calib {s.calib}")
    return make_batches(longest_first(sequences), s.batch_size, pad_token_id(tokenizer))


def _copy_outside_layers(writer: BundleWriter, reader: CheckpointReader, key_map: KeyMap, layers_path: str) -> None:
    """Embeddings, final norm, output head: copied as stored."""
    for key in reader.keys():
        name = key_map.model_key(key)
        if not name.startswith(layers_path + ".") and key in key_map.to_model:
            writer.add_base_tensor(name, reader.get(key))
    reader.release()


def _write_configs(writer: BundleWriter, s: ConvertSettings, source: ModelSource, quantizer: Quantizer,
                   stored_dtypes: set[torch.dtype], model: nn.Module, layers_path: str,
                   targets: list[dict[str, nn.Module]], shapes: dict[str, tuple[int, int]],
                   values: BundleValues | None = None) -> None:
    """config.json with quantization_config, quailora_init/adapter_config.json, and the source's tokenizer files.
    values: the largest values the bundle computes with, which its compute dtype must hold (compute_dtype)."""
    source_config = read_config(source.folder)  # the original text, untouched but for quantization_config
    declared = config_dtype(source_config) or (next(iter(stored_dtypes)) if len(stored_dtypes) == 1 else torch.float32)
    compute = choose_compute_dtype(declared, stored_dtypes, values or BundleValues())  # or wider, with a warning
    linears = list(linear_modules(model))
    decoder_linears = {n for n in linears if n.startswith(layers_path + ".")}
    skip = [n for n in linears if n not in decoder_linears]  # left in full precision
    writer.write_json(CONFIG, quantized_config(source_config, quantizer.loader_options(compute.dtype), skip,
                                               compute.dtype if compute.changed else None))
    ranks, alphas = rank_patterns(shapes, s.rank, s.lora_alpha, s.use_rslora)
    writer.write_json(INIT_ADAPTER_CONFIG, adapter_config(
        str(Path(s.out).resolve()), peft_target_modules(set(shapes), decoder_linears), s.rank, s.lora_alpha, s.use_rslora,
        ranks, alphas))
    writer.copy_files(source.folder, COPIED_FROM_SOURCE)
