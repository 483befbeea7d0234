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
from dataclasses import asdict, replace
from functools import cache
from pathlib import Path
from typing import Callable

import torch

from .bundle.layout import (EVAL, INIT_ADAPTER_CONFIG, INIT_ADAPTER_DIR, REPORT, config_dtype, position_limit,
                            read_config)
from .bundle.read import read_json, refuse_root_adapter, verify_bundle
from .calibration import self_generated
from .calibration.batches import make_batches, pad_token_id, sample_token_sequences
from .calibration.texts import check_text_source, read_texts
from .errors import BadInputError, QuailoraError
from .eval_settings import EvalSettings
from .events import EvalBatchDone, EvalDone, EvalModelStarted, EvalRowDone, Listener, Status, TextGenerated, ignore
from .quiet_libraries import quiet_libraries
from .sources.fingerprint import changed_files
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
    if settings.data not in (None, self_generated.SELF):
        check_text_source(settings.data, "--data")  # before any library or model loads
    settings = _within_positions(settings, bundle)
    with ExitStack() as stack:
        stack.enter_context(quiet_libraries(runs_4bit_on_cpu=True))  # library warnings nobody can act on
        if settings.skip_source:
            source_folder, source_note = None, "skipped"
        else:
            source_folder, source_note = _source_folder(settings, report, opened, stack, on_event)
        dtype = config_dtype(read_config(bundle)) or torch.float32
        loaders = _loaders(bundle, report, source_folder, dtype)
        lost = _rows_lost(bundle, [name for name, _, _ in loaders], settings.replace_eval)
        if lost and settings.json_path is None:  # before any model runs
            raise _less_complete(bundle, lost)
        tokenizer = AutoTokenizer.from_pretrained(bundle)
        sequences, data = _heldout(settings, report, source_folder, tokenizer, on_event)
        rows, details = _perplexities(loaders, sequences, settings.batch_size, pad_token_id(tokenizer), on_event)

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
    write_result(bundle, result, settings.json_path, settings.replace_eval)
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
    settings = report["settings"]
    if settings.get("rounding", "nearest") == "nearest" and settings.get("scales", "absmax") == "absmax":
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


def write_result(bundle: Path, result: dict, json_path: Path | None = None, replace: bool = False) -> Path | None:
    """result into the bundle's quailora_eval.json and json_path. A result with fewer rows than the bundle's
    (e.g. without the source rows) replaces it only with replace; else it goes to json_path alone (the bundle's
    is kept, with a warning) or is refused. Returns the bundle file written, None when it was kept."""
    text = json.dumps(result, indent=2) + "\n"
    kept = _rows_lost(bundle, [row["model"] for row in result["rows"]], replace)
    if kept and json_path is None:
        raise _less_complete(bundle, kept)
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text)
    if kept:
        log.warning("%s kept: it has rows this result lacks (%s); this result is in %s only (--replace-eval "
                    "replaces it)", Path(bundle) / EVAL, ", ".join(kept), json_path)
        return None
    (Path(bundle) / EVAL).write_text(text)
    return Path(bundle) / EVAL


def _rows_lost(bundle: Path, rows: list[str], replace: bool) -> list[str]:
    """The rows of the bundle's quailora_eval.json that rows lack: what writing rows over it would lose."""
    path = Path(bundle) / EVAL
    if replace or not path.exists():
        return []
    try:
        earlier = [row["model"] for row in json.loads(path.read_text())["rows"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # unreadable: nothing in it to keep
    return [name for name in earlier if name not in rows]


def _less_complete(bundle: Path, lost: list[str]) -> BadInputError:
    return BadInputError(f"{Path(bundle) / EVAL} has rows this eval would not compute ({', '.join(lost)}): not "
                         "replaced; pass --replace-eval to replace it, --json FILE to write this result there only, "
                         "or --source MODEL for the source rows")


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


def _within_positions(s: EvalSettings, bundle: Path) -> EvalSettings:
    """s with --seq-len at most the model's positions, with a warning, as convert clamps it: a learned position
    table has no row past its end (GPT-2's n_positions), and a RoPE model was never trained there."""
    from transformers import AutoConfig

    limit = position_limit(AutoConfig.from_pretrained(bundle))
    if limit is None or s.seq_len <= limit[0]:
        return s
    log.warning("--seq-len %d exceeds the %d positions of the model (config.json %s); evaluating on sequences of "
                "at most %d tokens", s.seq_len, limit[0], limit[1], limit[0])
    return replace(s, seq_len=limit[0])


def _read_report(bundle: Path) -> dict:
    if not bundle.is_dir():
        raise BadInputError(f"DIR {bundle}: no such folder")
    refuse_root_adapter(bundle)
    if not (bundle / REPORT).exists() or not (bundle / INIT_ADAPTER_CONFIG).exists():
        raise BadInputError(f"{bundle} is not a QuAILoRA bundle (no {REPORT} or {INIT_ADAPTER_CONFIG})")
    verify_bundle(bundle)  # every file there and readable before any model loads: a broken bundle fails in a second
    return read_json(bundle / REPORT, "the conversion report")


def _source_folder(s: EvalSettings, report: dict, opened: ModelSource | None, stack: ExitStack,
                   on_event: Listener) -> tuple[Path | None, str]:
    """The source model's folder (kept open on stack), or None with the reason (the source rows are then left out).

    An explicit --source (or the source a conversion just read) is used as given. Otherwise the one the report
    records, only if it is the same model: a Hub source at its recorded commit; a local one whose files match
    the recorded fingerprint. Another model, or none, at the recorded path leaves the source rows out with a
    warning (they would compare the bundle with a model it was not made from)."""
    recorded = report["source"]
    if opened is not None:
        return opened.folder, str(s.source or recorded["model"])
    if s.source:
        source = stack.enter_context(open_model(str(s.source), on_status=lambda m: on_event(Status(m))))
        return source.folder, str(s.source)
    model = str(recorded["model"])
    try:
        source = stack.enter_context(open_model(model, recorded.get("commit"),
                                                on_status=lambda m: on_event(Status(m))))
    except QuailoraError as e:
        return _without_source(f"the recorded source is not available: {e}")
    if source.repo_id is None:
        problem = _not_the_recorded_model(recorded, source)
        if problem:
            return _without_source(f"{model} is not the model this bundle was converted from: {problem}")
    return source.folder, model


def _not_the_recorded_model(recorded: dict, source: ModelSource) -> str | None:
    """Why the local source opened from the report is not the model it records; None when its files match."""
    fingerprint = recorded.get("fingerprint")
    if not isinstance(fingerprint, dict) or "files" not in fingerprint:
        return "the report records no fingerprint of its files (a bundle from an earlier quailora-convert)"
    changed = changed_files(fingerprint, source.folder, source.gguf)
    if changed:
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        return f"{shown} differ from the recorded fingerprint"
    return None


def _without_source(reason: str) -> tuple[None, str]:
    log.warning("source rows left out: %s; give --source MODEL to compare against it", reason)
    return None, f"left out: {reason}"


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
        texts = read_texts(data, option="--data")
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
    """The bundle's base alone (plain QLoRA): PEFT's switch for the adapter."""
    with model.disable_adapter():
        yield


def _load_bundle(bundle: Path, dtype: torch.dtype):
    """The quantized base at the bundle's root with the adapter from its quailora_init/, attached once by PEFT.

    PEFT keeps the LoRA factors in float32 as stored (autocast_adapter_dtype) over a bf16/fp16 base.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(bundle, dtype=dtype, device_map=_device_map())
    return PeftModel.from_pretrained(base, bundle, subfolder=INIT_ADAPTER_DIR).eval()
