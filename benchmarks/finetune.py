"""Does an init's advantage survive fine-tuning? Held-out perplexity curves of QLoRA fine-tunes, over seeds.

Runs (each a plain PEFT model trained by transformers' Trainer, nothing of ours in the loop), loaded as a
user loads them: `base = AutoModelForCausalLM.from_pretrained(BUNDLE, dtype=torch.float32)`,
`prepare_model_for_kbit_training(base)`, then
- every --bundle LABEL=PATH: `PeftModel.from_pretrained(base, BUNDLE, subfolder="quailora_init",
  is_trainable=True)`: the bundle's init on the bundle's base;
- --plain LABEL=PATH: `get_peft_model(base, LoraConfig.from_pretrained(BUNDLE, subfolder="quailora_init"))`:
  the bundle's base with PEFT's default LoRA init (lora_A Kaiming-uniform, lora_B = 0), same r, alpha, targets;
- --int8 [LABEL]: --source loaded with BitsAndBytesConfig(load_in_8bit=True), the same LoraConfig (int8 QLoRA).
On a float32 load prepare_model_for_kbit_training casts nothing (no float16/bfloat16 parameter is left) and
freezes what PEFT freezes anyway; what it changes is that it turns gradient checkpointing on: the same math
(dropout is 0), each layer's forward run twice; --no-gradient-checkpointing passes use_gradient_checkpointing=False
(see the run JSON's seconds). The 4-bit base computes in the dtype the bundle's config.json names
(bnb_4bit_compute_dtype), as a user's does; the LoRA factors are float32.

The paper's hyperparameters: lr 2e-4, AdamW (adamw_torch), warm-up 3% then linear decay, total batch 16
(--micro-batch x gradient accumulation), LoRA dropout 0, Trainer's max_grad_norm 1.0.

Data. Task: code_alpaca_2k.json as Alpaca prompts, split once with --split-seed into --eval-records held-out
records and the rest for training, records cut to --max-len tokens. Each --seeds / --seed-list seed S is one
data order (Trainer's seed and data_seed) and, for --plain and --int8, PEFT's random lora_A (torch.manual_seed(S)
before the adapter is made); the held-out records are the same for every seed. Forgetting: --forget-records
records of self_instruct_alpaca.jsonl (general instructions written by people: another distribution than code,
in the same Alpaca format, so a rise in its perplexity is what the code fine-tune cost elsewhere, not a format
change). The conversions calibrate on that file, so the records taken are ones the default calibration
(--forget-calib-samples 128 records drawn with --forget-calib-seed 0, by the library's own draw) never read; a
bundle calibrated on more samples (512: all 427 records) has seen them through H, its activations' second
moments, never through a loss on their tokens.

Measured before training and every 1/5 of --steps: both held-out perplexities, in train mode under
torch.no_grad() (dropout is 0, so train mode computes what eval mode does: on CPU, bitsandbytes 0.50 repacks
4-bit weights at the first eval-mode forward and training after it is corrupted, so nothing here calls
model.eval()), and the distance of the adapter's product from its init, ||s (B A - B0 A0)||_F (relative to
||s B0 A0||_F where the init is not zero). At init: ||A||_F, ||B||_F and ||s B A||_F per module kind and over
all modules (s: PEFT's scaling). Every step: the loss and Trainer's grad_norm (before clipping); the first 20
steps' grad norms are summarised. Each run records its process CPU seconds and wall seconds.

Files. Each (label, seed) run writes --out/runs/LABEL/seed-S.json when it is done (written to a .tmp file, then
renamed), and is skipped when that file is there: a long study runs in parts, in several processes (each run
holds a .lock while it trains; --threads sets torch's threads), and resumes. A run whose file was made under
another protocol (steps, data, ...) or from another bundle is refused, never mixed. After its runs, and with
`finetune.py report --out DIR`, the table (DIR/report.md, DIR/report.json) and the plot (DIR/finetune.png:
mean with a min-max band per init) are built from whatever runs are there.

    OMP_NUM_THREADS=1 python benchmarks/finetune.py --out /work/study/ft --threads 1 --seeds 3 \\
        --bundle nearest-exact=/work/study/bundles/nearest-exact \\
        --plain plain=/work/study/bundles/nearest-exact --int8 int8
    python benchmarks/finetune.py report --out /work/study/ft
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from workplace import DEFAULT_CALIB, DEFAULT_SOURCE, SHARED

DEFAULT_DATA = SHARED / "data" / "calib" / "code_alpaca_2k.json"
TOTAL_BATCH = 16
LEARNING_RATE = 2e-4
WARMUP_RATIO = 0.03
MAX_GRAD_NORM = 1.0  # Trainer's default
CURVE_POINTS = 5
GRAD_NORM_STEPS = 20  # the early steps whose gradient norm is summarised
LABEL_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a label names a folder
RUNS = "runs"
KINDS = ("bundle", "plain", "int8")


# ---- data

def split_records(path: Path, eval_records: int, seed: int) -> tuple[list[str], list[str]]:
    """(train texts, held-out texts): one shuffle with seed, the first eval_records held out."""
    from quailora_convert.calibration.formats import format_alpaca

    data = json.loads(path.read_text())
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    texts = [format_alpaca(data[i]) for i in order]
    return texts[eval_records:], texts[:eval_records]


class _PositionTokenizer:
    """A stand-in tokenizer: the text "i" is the sequence [i, i]; the library's draw depends only on the count."""

    def __call__(self, text: str, **kwargs) -> dict:
        return {"input_ids": [int(text)] * 2}


def calibration_draw(count: int, num_samples: int, seed: int) -> set[int]:
    """Positions of the records a conversion with --num-samples num_samples --seed seed reads from a local file
    of count records (each of 2 tokens or more), by the library's own draw (sample_token_sequences)."""
    from quailora_convert.calibration.batches import sample_token_sequences

    chosen = sample_token_sequences([str(i) for i in range(count)], _PositionTokenizer(), num_samples, 2, seed,
                                    min_tokens=0)
    return {sequence[0] for sequence in chosen}


def forget_texts(path: Path, count: int, calib_samples: int, calib_seed: int) -> list[str]:
    """The first count records of path (in file order, as the calibration formats them) that a calibration of
    calib_samples records drawn with calib_seed did not read."""
    from quailora_convert.calibration.files import read_file_texts

    texts = read_file_texts(path, "--forget-data")
    drawn = calibration_draw(len(texts), calib_samples, calib_seed)
    unread = [text for i, text in enumerate(texts) if i not in drawn]
    if len(unread) < count:
        raise SystemExit(f"{path}: {len(unread)} records left after the calibration's draw, fewer than "
                         f"--forget-records {count}")
    return unread[:count]


def tokenized(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    return [ids for ids in (tokenizer(t, truncation=True, max_length=max_len)["input_ids"] for t in texts)
            if len(ids) >= 2]


def heldout_perplexity(model, sequences: list[list[int]], batch_size: int, pad_id: int) -> float:
    """Token-level perplexity in train mode under no_grad (see the module docstring)."""
    import torch

    from quailora_convert.calibration.batches import make_batches

    was_training = model.training
    model.train()
    device = next(p for p in model.parameters()).device
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for batch in make_batches(sequences, batch_size, pad_id):
            ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            nll += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100,
                                                           reduction="sum"))
            tokens += int((targets != -100).sum())
    model.train(was_training)
    return math.exp(nll / tokens)


# ---- models, loaded as a user loads them

@dataclass(frozen=True)
class RunSpec:
    """One init to fine-tune: a label (its folder under runs/), a kind (KINDS) and the bundle it comes from."""

    label: str
    kind: str
    bundle: Path


def device_map(device: str) -> dict:
    return {} if device == "cpu" else {"device_map": {"": device}}


def load_base(path: Path, device: str, checkpointing: bool, quantization_config=None):
    from peft import prepare_model_for_kbit_training
    import torch
    from transformers import AutoModelForCausalLM

    extra = {"quantization_config": quantization_config} if quantization_config is not None else {}
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **device_map(device), **extra)
    return prepare_model_for_kbit_training(base, use_gradient_checkpointing=checkpointing)


def adapter_config(bundle: Path):
    from peft import LoraConfig

    from quailora_convert.bundle.layout import INIT_ADAPTER_DIR

    return LoraConfig.from_pretrained(str(bundle), subfolder=INIT_ADAPTER_DIR)


def load_model(spec: RunSpec, source: Path, device: str, checkpointing: bool):
    from peft import PeftModel, get_peft_model
    from transformers import BitsAndBytesConfig

    from quailora_convert.bundle.layout import INIT_ADAPTER_DIR

    if spec.kind == "bundle":
        base = load_base(spec.bundle, device, checkpointing)
        return PeftModel.from_pretrained(base, str(spec.bundle), subfolder=INIT_ADAPTER_DIR, is_trainable=True)
    config = adapter_config(spec.bundle)
    config.init_lora_weights = True  # PEFT's default init, whatever the file says
    if spec.kind == "plain":
        return get_peft_model(load_base(spec.bundle, device, checkpointing), config)
    base = load_base(source, device, checkpointing, BitsAndBytesConfig(load_in_8bit=True))
    return get_peft_model(base, config)


def check_dropout_is_zero(model, label: str) -> None:
    for module in model.modules():
        dropout = getattr(module, "lora_dropout", None)
        if dropout is not None and "default" in dropout and getattr(dropout["default"], "p", 0.0):
            raise SystemExit(f"{label}: LoRA dropout is {dropout['default'].p}; train-mode evaluation needs 0")


# ---- the adapter's factors

def lora_factors(model) -> dict[str, tuple]:
    """module path -> (lora_A (r, in), scaling * lora_B (out, r)), float64 detached copies."""
    factors = {}
    for path, module in model.named_modules():
        if "default" in getattr(module, "lora_A", {}) and hasattr(module, "scaling"):
            A = module.lora_A["default"].weight.detach().double()
            B = module.lora_B["default"].weight.detach().double() * module.scaling["default"]
            factors[path] = (A.clone(), B.clone())
    if not factors:
        raise SystemExit("no LoRA layer in the model")
    return factors


def module_kind(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def product_norm_squared(A, B) -> float:
    """||B A||_F^2 from the r x r Gram matrices: tr((B^T B)(A A^T)), never forming the (out, in) product."""
    return float(((B.T @ B) * (A @ A.T)).sum())


def factor_norms(factors: dict[str, tuple]) -> dict[str, dict[str, float]]:
    """Per module kind and over "all" modules: ||A||_F, ||B||_F (lora_B as stored) and ||s B A||_F."""
    sums: dict[str, dict[str, float]] = {}
    for path, (A, sB) in factors.items():
        for kind in (module_kind(path), "all"):
            into = sums.setdefault(kind, {"A": 0.0, "B": 0.0, "scaled_BA": 0.0})
            into["A"] += float((A * A).sum())
            into["scaled_BA"] += product_norm_squared(A, sB)
            into["B_scaled"] = into.get("B_scaled", 0.0) + float((sB * sB).sum())
    return {kind: {"A": math.sqrt(v["A"]), "B": math.sqrt(v["B_scaled"]) / _scaling_of(factors, kind),
                   "scaled_BA": math.sqrt(v["scaled_BA"])} for kind, v in sums.items()}


def _scaling_of(factors: dict[str, tuple], kind: str) -> float:
    return 1.0  # placeholder, replaced below


def distance_from_init(factors: dict[str, tuple], init: dict[str, tuple]) -> dict[str, dict[str, float | None]]:
    """Per module kind and "all": ||s (B A - B0 A0)||_F, absolute and relative to ||s B0 A0||_F (None where that is
    0: PEFT's default init). Computed from [B, -B0] [A; A0] by its Gram matrices: cheap at any width."""
    import torch

    sums: dict[str, list[float]] = {}
    for path, (A, sB) in factors.items():
        A0, sB0 = init[path]
        moved = product_norm_squared(torch.cat([A, A0]), torch.cat([sB, -sB0], dim=1))
        for kind in (module_kind(path), "all"):
            into = sums.setdefault(kind, [0.0, 0.0])
            into[0] += max(moved, 0.0)
            into[1] += product_norm_squared(A0, sB0)
    return {kind: {"absolute": math.sqrt(d), "relative": math.sqrt(d / m) if m > 0 else None}
            for kind, (d, m) in sums.items()}
