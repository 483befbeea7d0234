"""Held-out perplexity of a bundle against plain QLoRA, the source model and the source in int8.

Rows, all loaded with the same dtype (the source's stored dtype, which is also the bundle's compute
dtype), put in eval mode and run under torch.no_grad() on the same token sequences:

- the source in full precision, and quantized by transformers' BitsAndBytesConfig(load_in_8bit=True)
  (when the source is available: the report's MODEL, or `source=`);
- the bundle's base with the adapter disabled: plain QLoRA;
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from . import calibration, self_calibration
from .bundle import REPORT_NAME
from .errors import BadInputError
from .pipeline import Event

log = logging.getLogger(__name__)
EVAL_NAME = "quailora_eval.json"
ROW_SOURCE, ROW_INT8, ROW_PLAIN, ROW_BUNDLE = "source", "source int8 (LLM.int8)", "QLoRA (adapter disabled)", "QuAILoRA bundle"


@dataclass
class EvalSettings:
    bundle: Path
    data: str | None = None  # file, preset or "self"; None: "self" when the source is available
    num_samples: int = 32
    seq_len: int = 256
    source: str | None = None  # default: the MODEL the report names
    batch_size: int = 8
    seed: int = 1234
    json_path: Path | None = None
    skip_source: bool = False  # only the two bundle rows


def evaluate(settings: EvalSettings, on_event: Callable[[Event], None] = lambda e: None) -> dict:
    """Compute every row, write quailora_eval.json into the bundle (and json_path); return the result."""
    from transformers import AutoTokenizer

    bundle = Path(settings.bundle)
    report = _read_report(bundle)
    if settings.num_samples < 1 or settings.seq_len < 2 or settings.batch_size < 1:
        raise BadInputError("--num-samples and --batch-size must be >= 1, --seq-len >= 2")
    source_folder, source_note = (None, "skipped") if settings.skip_source else _source_folder(settings, report, on_event)
    tokenizer = AutoTokenizer.from_pretrained(bundle)
    pad_id = calibration.pad_token_id(tokenizer)
    sequences, data = _heldout(settings, report, source_folder, tokenizer, on_event)
    dtype = _eval_dtype(bundle)
    bits = report["quantization"]["bits"]

    loaders: list[tuple[str, Callable[[], object], bool]] = []
    if source_folder is not None:
        loaders.append((f"{ROW_SOURCE} ({str(dtype).removeprefix('torch.')})", lambda: _load_source(source_folder, dtype), False))
        loaders.append((ROW_INT8, lambda: _load_source(source_folder, dtype, int8=True), False))
    load_bundle = _once(lambda: _load_bundle(bundle, dtype))  # one load serves both bundle rows
    loaders.append((ROW_PLAIN, load_bundle, True))
    loaders.append((ROW_BUNDLE, load_bundle, False))

    rows, details = [], []
    for index, (name, load, disable_adapter) in enumerate(loaders):
        on_event(Event("eval_model", {"model": name, "index": index, "count": len(loaders)}))
        model = load()
        with (model.disable_adapter() if disable_adapter else _nothing()):
            result = perplexity(model, sequences, settings.batch_size, pad_id, lambda done, total: on_event(
                Event("eval_batch", {"model": name, "done": done, "total": total})))
        del model
        gc.collect()
        rows.append({"model": name, "perplexity": result["perplexity"]})
        details.append({"model": name, **result})
        on_event(Event("eval_row", rows[-1]))

    by_name = {r["model"]: r["perplexity"] for r in rows}
    gap = None
    if bits == 4 and ROW_INT8 in by_name and by_name[ROW_PLAIN] != by_name[ROW_INT8]:
        gap = (by_name[ROW_PLAIN] - by_name[ROW_BUNDLE]) / (by_name[ROW_PLAIN] - by_name[ROW_INT8])
    result = {
        "rows": rows, "gap_closed": gap, "data": data,
        "details": details,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
        "sequences": len(sequences), "tokens": sum(len(s) for s in sequences), "dtype": str(dtype),
        "source": source_note, "bits": bits,
    }
    write_result(bundle, result, settings.json_path)
    on_event(Event("eval_done", {"result": result}))
    return result


def _once(load: Callable[[], object]) -> Callable[[], object]:
    """A loader that loads on its first call and returns that same object afterwards."""
    cache: list = []

    def get():
        if not cache:
            cache.append(load())
        return cache[0]

    return get


def write_result(bundle: Path, result: dict, json_path: Path | None = None) -> None:
    text = json.dumps(result, indent=2) + "\n"
    (Path(bundle) / EVAL_NAME).write_text(text)
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text)


def perplexity(model, sequences: list[list[int]], batch_size: int, pad_id: int,
               on_progress: Callable[[int, int], None] = lambda done, total: None) -> dict:
    """Token-level perplexity over right-padded batches of similar length."""
    model.eval()
    device = next(p.device for p in model.parameters())
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    batches = calibration.make_batches([sequences[i] for i in order], batch_size, pad_id)
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
    path = bundle / REPORT_NAME
    if not bundle.is_dir():
        raise BadInputError(f"DIR {bundle}: no such folder")
    if not path.exists() or not (bundle / "adapter_config.json").exists():
        raise BadInputError(f"{bundle} is not a QuAILoRA bundle (no {REPORT_NAME} or adapter_config.json)")
    return json.loads(path.read_text())


def _source_folder(s: EvalSettings, report: dict, on_event) -> tuple[Path | None, str]:
    """The source model's folder, or None with the reason (the source rows are then left out)."""
    from .hub import resolve_model

    model = s.source or report["source"]["model"]
    revision = None if s.source else report["source"].get("commit")
    if str(model).lower().endswith(".gguf"):
        on_event(Event("status", {"message": "dequantizing the GGUF source"}))
    try:
        folder = resolve_model(str(model), revision).folder
    except BadInputError as e:
        if s.source:
            raise
        log.warning("source rows left out: %s (give --source)", e)
        return None, f"unavailable: {e}"
    return folder, str(model)


def _heldout(s: EvalSettings, report: dict, source: Path | None, tokenizer, on_event) -> tuple[list[list[int]], str]:
    data = s.data
    if data is None:
        if source is None:
            raise BadInputError("eval: the source model is not available to generate held-out text; "
                                "give --data FILE (or --source MODEL)")
        data = self_calibration.SELF
    if data == self_calibration.SELF:
        if source is None:
            raise BadInputError("--data self needs the source model (give --source MODEL)")
        seed = s.seed + self_calibration.HELDOUT_SEED_OFFSET
        on_event(Event("status", {"message": "generating held-out text with the source model"}))
        texts = self_calibration.generate_texts(
            source, s.num_samples, s.seq_len, seed, self_calibration.HELDOUT_PROMPTS, device=_generation_device(),
            on_progress=lambda done, total: on_event(Event("generated", {"done": done, "total": total})))
        description = (f"self: {len(texts)} answers sampled from the source model to "
                       f"{len(self_calibration.HELDOUT_PROMPTS)} held-out prompts (seed {seed})")
    else:
        if data == report.get("settings", {}).get("calib"):
            log.warning("--data %s is the bundle's calibration data: this perplexity is not held out", data)
        texts = calibration.read_texts(data)
        description = str(data)
    sequences = calibration.sample_token_sequences(texts, tokenizer, s.num_samples, s.seq_len, s.seed)
    return sequences, f"{description}; {len(sequences)} sequences of at most {s.seq_len} tokens"


def _eval_dtype(bundle: Path) -> torch.dtype:
    config = json.loads((bundle / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    return torch.float32


def _generation_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _device_map():
    return {"": 0} if torch.cuda.is_available() else None


def _load_source(folder: Path, dtype: torch.dtype, int8: bool = False):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_8bit=True) if int8 else None
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, quantization_config=quantization,
                                                device_map=_device_map()).eval()


def _load_bundle(bundle: Path, dtype: torch.dtype):
    from peft import AutoPeftModelForCausalLM

    return AutoPeftModelForCausalLM.from_pretrained(bundle, dtype=dtype, device_map=_device_map()).eval()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
