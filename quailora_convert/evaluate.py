"""Held-out perplexity of a bundle against plain QLoRA, the source model and the source in int8.

Rows, all loaded with the same dtype (the source's stored dtype, which is also the bundle's compute
dtype), put in eval mode and run under torch.no_grad() on the same token sequences:

- the source in full precision, and quantized by transformers' BitsAndBytesConfig(load_in_8bit=True)
  (when the source is available: the report's MODEL, or `source=`);
- plain QLoRA: bitsandbytes' round-to-nearest quantization of the source. For a bundle whose base is
  round-to-nearest (--rounding nearest) that is the bundle's base with the adapter disabled; for a
  calibrated base (--rounding gptq) it is the source loaded with transformers' BitsAndBytesConfig (when the
  source is available), and the bundle's own base with the adapter disabled is a row of its own;
- the bundle: base + QuAILoRA adapter.

Perplexity is token level: exp(sum of next-token NLL / number of predicted tokens), padding excluded.
"gap closed" = (ppl_plain - ppl_bundle) / (ppl_plain - ppl_int8), for 4-bit bundles: the share of
the NF4 -> int8 perplexity gap the adapter's initialisation closes before any fine-tuning.

Held-out text: a file or preset (anything `--calib` accepts), or `self` (the default when the source
is available): the source model samples answers to prompts disjoint from `--calib self`'s, with
another seed. Self-generated text measures closeness to the source model's own distribution.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict
from functools import cache
from pathlib import Path
from typing import Callable

import torch

from .bundle.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EVAL, REPORT, config_dtype, read_config
from .bundle.read import read_json, verify_bundle
from .calibration import self_generated
from .calibration.batches import make_batches, pad_token_id, sample_token_sequences
from .calibration.texts import read_texts
from .errors import BadInputError
from .eval_settings import EvalSettings
from .events import EvalBatchDone, EvalDone, EvalModelStarted, EvalRowDone, Listener, Status, TextGenerated, ignore
from .quiet_libraries import quiet_libraries
from .sources.resolve import ModelSource, open_model

log = logging.getLogger(__name__)
ROW_SOURCE, ROW_INT8, ROW_BUNDLE = "source", "source int8 (LLM.int8)", "QuAILoRA bundle"
ROW_PLAIN = "plain QLoRA (bnb round-to-nearest)"
ROW_BASE = "bundle base (adapter disabled)"  # a calibrated (not round-to-nearest) base on its own


def evaluate(settings: EvalSettings, on_event: Listener = ignore, *, opened: ModelSource | None = None) -> dict:
    """Compute every row, write quailora_eval.json into the bundle (and json_path); return the result.

    opened: the source model already opened (sources.resolve.open_model, e.g. the one a conversion just
    read); default: settings.source, else the MODEL the report names, opened here.
    """
    from transformers import AutoTokenizer

    bundle = Path(settings.bundle)
    report = _read_report(bundle)
    if settings.num_samples < 1 or settings.seq_len < 2 or settings.batch_size < 1:
        raise BadInputError("--num-samples and --batch-size must be >= 1, --seq-len >= 2")
    with ExitStack() as stack:
        stack.enter_context(quiet_libraries(runs_4bit_on_cpu=True))  # library warnings nobody can act on
        if settings.skip_source:
            source_folder, source_note = None, "skipped"
        else:
            source_folder, source_note = _source_folder(settings, report, opened, stack, on_event)
        tokenizer = AutoTokenizer.from_pretrained(bundle)
        sequences, data = _heldout(settings, report, source_folder, tokenizer, on_event)
        dtype = config_dtype(read_config(bundle)) or torch.float32
        rows, details = _perplexities(_loaders(bundle, report, source_folder, dtype), sequences,
                                      settings.batch_size, pad_token_id(tokenizer), on_event)

    bits = report["quantization"]["bits"]
    by_name = {r["model"]: r["perplexity"] for r in rows}
    gap = None
    if bits == 4 and ROW_INT8 in by_name and ROW_PLAIN in by_name and by_name[ROW_PLAIN] != by_name[ROW_INT8]:
        gap = (by_name[ROW_PLAIN] - by_name[ROW_BUNDLE]) / (by_name[ROW_PLAIN] - by_name[ROW_INT8])
    result = {
        "rows": rows, "gap_closed": gap, "data": data,
        "details": details,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
        "sequences": len(sequences), "tokens": sum(len(s) for s in sequences), "dtype": str(dtype),
        "source": source_note, "bits": bits,
    }
    write_result(bundle, result, settings.json_path)
    on_event(EvalDone(result))
    return result


def _loaders(bundle: Path, report: dict, source_folder: Path | None,
             dtype: torch.dtype) -> list[tuple[str, Callable[[], object], bool]]:
    """(row name, model loader, adapter disabled) for every row, in table order."""
    loaders: list[tuple[str, Callable[[], object], bool]] = []
    if source_folder is not None:
        source_row = f"{ROW_SOURCE} ({str(dtype).removeprefix('torch.')})"
        loaders.append((source_row, lambda: _load_source(source_folder, dtype), False))
        loaders.append((ROW_INT8, lambda: _load_source(source_folder, dtype, int8=True), False))
    load_bundle = cache(lambda: _load_bundle(bundle, dtype))  # one load serves both bundle rows
    if report["settings"].get("rounding", "nearest") == "nearest":
        loaders.append((ROW_PLAIN, load_bundle, True))  # the base is bnb's own quantization
    else:
        if source_folder is not None:
            bits = report["quantization"]["bits"]
            loaders.append((ROW_PLAIN, lambda: _load_source_quantized(source_folder, dtype, bits), False))
        loaders.append((ROW_BASE, load_bundle, True))
    loaders.append((ROW_BUNDLE, load_bundle, False))
    return loaders


def _perplexities(loaders, sequences: list[list[int]], batch_size: int, pad_id: int,
                  on_event: Listener) -> tuple[list[dict], list[dict]]:
    rows, details = [], []
    for index, (name, load, disable_adapter) in enumerate(loaders):
        on_event(EvalModelStarted(name, index, len(loaders)))
        model = load()
        with (_adapter_disabled(model) if disable_adapter else nullcontext()):
            result = perplexity(model, sequences, batch_size, pad_id,
                                lambda done, total: on_event(EvalBatchDone(name, done, total)))
        del model
        gc.collect()
        rows.append({"model": name, "perplexity": result["perplexity"]})
        details.append({"model": name, **result})
        on_event(EvalRowDone(name, result["perplexity"]))
    return rows, details


def write_result(bundle: Path, result: dict, json_path: Path | None = None) -> None:
    text = json.dumps(result, indent=2) + "\n"
    (Path(bundle) / EVAL).write_text(text)
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text)


def perplexity(model, sequences: list[list[int]], batch_size: int, pad_id: int,
               on_progress: Callable[[int, int], None] = lambda done, total: None) -> dict:
    """Token-level perplexity over right-padded batches of similar length."""
    model.eval()
    device = next(p.device for p in model.parameters())
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    batches = make_batches([sequences[i] for i in order], batch_size, pad_id)
    nll, count, started = 0.0, 0, time.perf_counter()
    with torch.no_grad():
        for done, batch in enumerate(batches, 1):
            ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
            targets, keep = ids[:, 1:], mask[:, 1:].bool()
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T-1)
            nll += float(losses[keep].double().sum())
            count += int(keep.sum())
            del logits, losses
            on_progress(done, len(batches))
    if not math.isfinite(nll):
        raise FloatingPointError("perplexity: the model produced non-finite losses")
    return {"perplexity": math.exp(nll / count), "nll_sum": nll, "tokens": count, "seconds": time.perf_counter() - started}


def _read_report(bundle: Path) -> dict:
    if not bundle.is_dir():
        raise BadInputError(f"DIR {bundle}: no such folder")
    if not (bundle / REPORT).exists() or not (bundle / ADAPTER_CONFIG).exists():
        raise BadInputError(f"{bundle} is not a QuAILoRA bundle (no {REPORT} or {ADAPTER_CONFIG})")
    verify_bundle(bundle)  # every file there and readable before any model loads: a broken bundle fails in a second
    return read_json(bundle / REPORT, "the conversion report")


def _source_folder(s: EvalSettings, report: dict, opened: ModelSource | None, stack: ExitStack,
                   on_event: Listener) -> tuple[Path | None, str]:
    """The source model's folder (kept open on stack), or None with the reason (the source rows are then left out)."""
    model = str(s.source or report["source"]["model"])
    if opened is not None:
        return opened.folder, model
    revision = None if s.source else report["source"].get("commit")
    try:
        source = stack.enter_context(open_model(model, revision, on_status=lambda m: on_event(Status(m))))
    except BadInputError as e:
        if s.source:
            raise
        log.warning("source rows left out: %s (give --source)", e)
        return None, f"unavailable: {e}"
    return source.folder, model


def _heldout(s: EvalSettings, report: dict, source: Path | None, tokenizer, on_event: Listener) -> tuple[list[list[int]], str]:
    data = s.data
    if data is None:
        if source is None:
            raise BadInputError("eval: the source model is not available to generate held-out text; "
                                "give --data FILE (or --source MODEL)")
        data = self_generated.SELF
    if data == self_generated.SELF:
        if source is None:
            raise BadInputError("--data self needs the source model (give --source MODEL)")
        seed = s.seed + self_generated.HELDOUT_SEED_OFFSET
        on_event(Status("generating held-out text with the source model"))
        texts = self_generated.generate_texts(
            source, s.num_samples, s.seq_len, seed, self_generated.HELDOUT_PROMPTS, device=_generation_device(),
            on_progress=lambda done, total: on_event(TextGenerated(done, total)))
        description = (f"self: {len(texts)} answers sampled from the source model to "
                       f"{len(self_generated.HELDOUT_PROMPTS)} held-out prompts (seed {seed})")
    else:
        if data == report.get("settings", {}).get("calib"):
            log.warning("--data %s is the bundle's calibration data: this perplexity is not held out", data)
        texts = read_texts(data)
        description = str(data)
    sequences = sample_token_sequences(texts, tokenizer, s.num_samples, s.seq_len, s.seed)
    return sequences, f"{description}; {len(sequences)} sequences of at most {s.seq_len} tokens"


def _generation_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _device_map():
    return {"": 0} if torch.cuda.is_available() else None


def _load_source(folder: Path, dtype: torch.dtype, int8: bool = False):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_8bit=True) if int8 else None
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, quantization_config=quantization,
                                                device_map=_device_map()).eval()


def _load_source_quantized(folder: Path, dtype: torch.dtype, bits: int):
    """The source quantized on load by transformers as plain QLoRA does (bnb round-to-nearest)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from .core.quantize import quantizer_for

    quantization = BitsAndBytesConfig(**quantizer_for(bits).loader_options(dtype))
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, quantization_config=quantization,
                                                device_map=_device_map()).eval()


@contextmanager
def _adapter_disabled(model):
    """The bundle's base alone (plain QLoRA): transformers' switch for the adapter it attached."""
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()


def _load_bundle(bundle: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    # a complete checkpoint with its adapter beside it: transformers attaches the adapter, once
    model = AutoModelForCausalLM.from_pretrained(bundle, dtype=dtype, device_map=_device_map())
    _adapter_in_float32(model, bundle)
    return model.eval()


def _adapter_in_float32(model, bundle: Path) -> None:
    """The LoRA factors as stored (float32), not rounded to the load dtype: as PEFT keeps and trains them
    (PeftModel's autocast_adapter_dtype); transformers' own adapter loading casts them to dtype."""
    from safetensors.torch import load_file

    stored = load_file(str(bundle / ADAPTER_WEIGHTS))
    for name, module in model.named_modules():
        for factor in ("lora_A", "lora_B"):
            layers = getattr(module, factor, None)
            if not isinstance(layers, torch.nn.ModuleDict) or "default" not in layers:
                continue
            key = f"base_model.model.{name}.{factor}.weight"
            weight = layers["default"].weight
            if key not in stored or stored[key].shape != weight.shape:
                raise BadInputError(f"{bundle / ADAPTER_WEIGHTS} has no {key} of shape {tuple(weight.shape)}")
            weight.data = stored[key].to(device=weight.device, dtype=torch.float32)
