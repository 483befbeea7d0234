"""Does an init's advantage survive fine-tuning? Held-out perplexity curves of QLoRA fine-tunes, over seeds.

Runs (each a plain PEFT model trained by transformers' Trainer, nothing of ours in the loop), loaded as a
user loads them: `base = AutoModelForCausalLM.from_pretrained(BUNDLE, dtype=torch.float32)`,
`prepare_model_for_kbit_training(base)`, then
- every --bundle LABEL=PATH: `PeftModel.from_pretrained(base, BUNDLE, subfolder="quailora_init",
  is_trainable=True)`: the bundle's init on the bundle's base;
- --plain LABEL=PATH: `get_peft_model(base, LoraConfig.from_pretrained(BUNDLE, subfolder="quailora_init"))`:
  the bundle's base with PEFT's default LoRA init (lora_A Kaiming-uniform, lora_B = 0), same r, alpha, targets;
- --int8 [LABEL]: --source loaded with BitsAndBytesConfig(load_in_8bit=True), the same LoraConfig (int8 QLoRA).
A 4-bit load keeps the unquantized weights (embeddings, norms) in the checkpoint's bfloat16 whatever dtype= says;
prepare_model_for_kbit_training casts them to float32 and freezes what PEFT freezes anyway; it also turns gradient
checkpointing on: the same math
(dropout is 0), each layer's forward run twice; --no-gradient-checkpointing passes use_gradient_checkpointing=False
(see the run JSON's seconds). The 4-bit base computes in the dtype the bundle's config.json names
(bnb_4bit_compute_dtype), as a user's does; the LoRA factors are float32, unless --adapter-dtype LABEL=bfloat16
trains them in bfloat16 (where transformers' load_adapter leaves them on a 4-bit model, and TRL's SFTTrainer
casts them): an Adam step of size u is then rounded away on every factor entry larger than 256 u to 512 u.

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
        --no-gradient-checkpointing --plain plain=/work/study/bundles/nearest-exact --int8 int8 \\
        --bundle nearest-exact=/work/study/bundles/nearest-exact
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
import shutil
import time
from dataclasses import dataclass, replace
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
ADAPTER_DTYPES = ("float32", "bfloat16")
RUNS = "runs"


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


def summed_token_nll(model, ids, mask) -> tuple:
    """(the summed negative log-likelihood of every predicted real token, as a tensor, and their count)."""
    import torch

    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    summed = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="sum")
    return summed, int((targets != -100).sum())


def heldout_perplexity(model, sequences: list[list[int]], batch_size: int, pad_id: int) -> float:
    """Token-level perplexity in train mode under no_grad (see the module docstring); batched longest first, so
    each batch pads to a length its rows share (the sum over tokens does not depend on the order)."""
    import torch

    from quailora_convert.calibration.batches import longest_first, make_batches

    was_training = model.training
    model.train()
    device = next(p for p in model.parameters()).device
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for batch in make_batches(longest_first(sequences), batch_size, pad_id):
            summed, count = summed_token_nll(model, batch.input_ids.to(device), batch.attention_mask.to(device))
            nll += float(summed)
            tokens += count
    model.train(was_training)
    return math.exp(nll / tokens)


# ---- models, loaded as a user loads them

@dataclass(frozen=True)
class RunSpec:
    """One init to fine-tune: a label (its folder under runs/), a kind (bundle, plain or int8) and the bundle it comes from."""

    label: str
    kind: str
    bundle: Path
    adapter_dtype: str = "float32"  # the LoRA factors' dtype while training (--adapter-dtype)


def device_map(device: str) -> dict:
    return {} if device == "cpu" else {"device_map": {"": device}}


def load_base(path: Path, device: str, checkpointing: bool, quantization_config=None):
    import torch
    from peft import prepare_model_for_kbit_training
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
        model = PeftModel.from_pretrained(base, str(spec.bundle), subfolder=INIT_ADAPTER_DIR, is_trainable=True)
    else:
        config = adapter_config(spec.bundle)
        config.init_lora_weights = True  # PEFT's default init, whatever the file says
        if spec.kind == "plain":
            base = load_base(spec.bundle, device, checkpointing)
        else:
            base = load_base(source, device, checkpointing, BitsAndBytesConfig(load_in_8bit=True))
        model = get_peft_model(base, config)
    return with_adapter_dtype(model, spec.adapter_dtype)


def with_adapter_dtype(model, dtype_name: str):
    """model with its LoRA factors cast to dtype_name, as they train: bfloat16 is where transformers'
    load_adapter leaves them on a 4-bit model, and where TRL's SFTTrainer casts a 4-bit model's trainable
    parameters (the earlier study's loading path; the model card's recipe casts them back to float32)."""
    import torch

    dtype = getattr(torch, dtype_name)
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.data = parameter.data.to(dtype)
    return model


def check_dropout_is_zero(model, label: str) -> None:
    for module in model.modules():
        dropout = getattr(module, "lora_dropout", None)
        if dropout is not None and "default" in dropout and getattr(dropout["default"], "p", 0.0):
            raise SystemExit(f"{label}: LoRA dropout is {dropout['default'].p}; train-mode evaluation needs 0")


# ---- the adapter's factors

def lora_factors(model) -> dict[str, tuple]:
    """module path -> (lora_A (r, in), lora_B (out, r), scaling): float64 detached copies of the factors."""
    factors = {}
    for path, module in model.named_modules():
        if "default" in getattr(module, "lora_A", {}) and hasattr(module, "scaling"):
            A = module.lora_A["default"].weight.detach().double().clone()
            B = module.lora_B["default"].weight.detach().double().clone()
            factors[path] = (A, B, float(module.scaling["default"]))
    if not factors:
        raise SystemExit("no LoRA layer in the model")
    return factors


def module_kind(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def product_norm_squared(A, B) -> float:
    """||B A||_F^2 from the r x r Gram matrices: tr((B^T B)(A A^T)), never forming the (out, in) product."""
    return float(((B.T @ B) * (A @ A.T)).sum())


def factor_norms(factors: dict[str, tuple]) -> dict[str, dict[str, float]]:
    """Per module kind and over "all" modules: ||A||_F, ||B||_F (as stored) and ||s B A||_F (the correction M)."""
    squares: dict[str, dict[str, float]] = {}
    for path, (A, B, scaling) in factors.items():
        for kind in (module_kind(path), "all"):
            into = squares.setdefault(kind, {"A": 0.0, "B": 0.0, "scaled_BA": 0.0})
            into["A"] += float((A * A).sum())
            into["B"] += float((B * B).sum())
            into["scaled_BA"] += scaling ** 2 * max(product_norm_squared(A, B), 0.0)
    return {kind: {name: math.sqrt(value) for name, value in values.items()} for kind, values in squares.items()}


def distance_from_init(factors: dict[str, tuple], init: dict[str, tuple]) -> dict[str, dict[str, float | None]]:
    """Per module kind and "all": ||s (B A - B0 A0)||_F, absolute and relative to ||s B0 A0||_F (None where that is
    0: PEFT's default init). The difference is [B, -B0] [A; A0]: its norm from the 2r x 2r Gram matrices."""
    import torch

    squares: dict[str, list[float]] = {}
    for path, (A, B, scaling) in factors.items():
        A0, B0, _ = init[path]
        moved = scaling ** 2 * max(product_norm_squared(torch.cat([A, A0]), torch.cat([B, -B0], dim=1)), 0.0)
        start = scaling ** 2 * max(product_norm_squared(A0, B0), 0.0)
        for kind in (module_kind(path), "all"):
            into = squares.setdefault(kind, [0.0, 0.0])
            into[0] += moved
            into[1] += start
    return {kind: {"absolute": math.sqrt(moved), "relative": math.sqrt(moved / start) if start > 0 else None}
            for kind, (moved, start) in squares.items()}


# ---- one run

@dataclass
class Study:
    """What every run of an invocation shares: the protocol, the tokenized data, where files go."""

    protocol: dict  # what makes two runs comparable; a run file made under another one is refused
    train_ids: list[list[int]]
    eval_ids: dict[str, list[list[int]]]  # "task", "forget"
    pad_id: int
    source: Path
    device: str
    checkpointing: bool
    micro_batch: int
    eval_batch: int
    threads: int | None
    out: Path


def checkpoints(steps: int) -> list[int]:
    """The steps after step 0 where both perplexities are measured: every 1/CURVE_POINTS of steps."""
    return sorted({round(steps * k / CURVE_POINTS) for k in range(1, CURVE_POINTS + 1)} - {0})


def measure(model, study: Study, step: int, init: dict | None) -> dict:
    point = {"step": step, **{name: heldout_perplexity(model, ids, study.eval_batch, study.pad_id)
                              for name, ids in study.eval_ids.items()}}
    if init is not None:
        point["distance"] = distance_from_init(lora_factors(model), init)
    return point


def train_one(spec: RunSpec, seed: int, study: Study, stop_after: int | None = None) -> dict | None:
    """Fine-tune one init with one seed; the run's record (curve, losses, norms, seconds), or None when it stopped
    at a checkpoint at or after stop_after (its state kept in the partial folder, resumed by the next call)."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from quailora_convert.calibration.batches import make_batches

    clock = Clock()
    partial = PartialRun(partial_path(study.out, spec.label, seed))
    torch.manual_seed(seed)  # PEFT's random lora_A for --plain and --int8
    model = load_model(spec, study.source, study.device, study.checkpointing)
    clock.lap("load")
    check_dropout_is_zero(model, spec.label)
    init = lora_factors(model)
    init_norms = factor_norms(init)
    steps = study.protocol["steps"]
    wanted = checkpoints(steps)
    saved = partial.progress(spec, seed, study.protocol, init_norms, study.micro_batch)

    def timed_measure(step: int) -> dict:
        clock.lap("train")  # the steps since the last lap (nothing before step 0)
        point = measure(model, study, step, init)
        clock.lap("eval")
        print(f"{spec.label} seed {seed}: step {step} " + " ".join(f"{k} ppl {point[k]:.4f}" for k in study.eval_ids)
              + f" ({clock.seconds()['cpu']:.0f} CPU s)", flush=True)
        return point

    if saved is None:
        curve, logged, resumed = [timed_measure(0)], [], []
    else:
        curve, logged, resumed = saved["curve"], saved["losses"], [*saved["resumed"], saved["step"]]
        clock.carry(saved["seconds"])
        print(f"{spec.label} seed {seed}: resumed at step {saved['step']} from {partial.folder}", flush=True)

    class Checkpoints(TrainerCallback):
        def on_step_end(self, training_args, state, control, **kwargs):
            if state.global_step in wanted:
                curve.append(timed_measure(state.global_step))
                control.should_save = state.global_step < steps  # the Trainer's state, to resume from here

        def on_log(self, training_args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                logged.append({"step": state.global_step, "loss": logs["loss"], "grad_norm": logs.get("grad_norm")})

        def on_save(self, training_args, state, control, **kwargs):
            partial.commit(state.global_step, {
                "label": spec.label, "kind": spec.kind, "bundle": str(spec.bundle), "seed": seed,
                "protocol": study.protocol, "micro_batch": study.micro_batch, "init_norms": init_norms,
                "curve": curve, "losses": logged,
                "resumed": resumed, "seconds": clock.seconds()})
            if stop_after is not None and state.global_step >= stop_after:
                control.should_training_stop = True

    def collate(examples):
        [batch] = make_batches([e["input_ids"] for e in examples], len(examples), study.pad_id)
        ids, mask = batch.input_ids, batch.attention_mask
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    training = TrainingArguments(  # saves only where Checkpoints asks: at each measured step before the last
        output_dir=str(partial.folder), max_steps=steps, learning_rate=LEARNING_RATE,
        warmup_steps=WARMUP_RATIO,  # a float: the fraction
        lr_scheduler_type="linear", optim="adamw_torch", per_device_train_batch_size=study.micro_batch,
        gradient_accumulation_steps=TOTAL_BATCH // study.micro_batch, max_grad_norm=MAX_GRAD_NORM,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], seed=seed, data_seed=seed,
        remove_unused_columns=False, use_cpu=study.device == "cpu", disable_tqdm=True,
    )
    dataset = [{"input_ids": ids} for ids in study.train_ids]
    trainer = Trainer(model=model, args=training, train_dataset=dataset, data_collator=collate,
                      callbacks=[Checkpoints()])
    clock.lap("load")  # the Trainer's set-up
    trainer.train(resume_from_checkpoint=None if saved is None else str(partial.checkpoint(saved["step"])))
    clock.lap("train")
    if trainer.state.global_step < steps:
        return None  # stopped at a checkpoint: the partial folder holds it
    early = [entry["grad_norm"] for entry in logged[:GRAD_NORM_STEPS] if entry["grad_norm"] is not None]
    return {
        "label": spec.label, "kind": spec.kind, "bundle": str(spec.bundle), "seed": seed,
        "adapter_dtype": spec.adapter_dtype, "protocol": study.protocol, "bundle_settings": bundle_settings(spec.bundle),
        "compute": {"device": study.device, "threads": study.threads, "micro_batch": study.micro_batch,
                    "gradient_checkpointing": study.checkpointing, "base_compute_dtype": base_compute_dtype(model),
                    "versions": versions()},
        "curve": curve, "losses": logged,
        "grad_norm_first": {"steps": len(early), "mean": statistics.fmean(early) if early else None,
                            "max": max(early) if early else None},
        "init_norms": init_norms, "resumed_at": resumed,
        "seconds": clock.seconds(),
    }


class Clock:
    """Wall and process CPU seconds of a run, in all and by part (load, train: the optimizer steps, eval); a
    resumed run carries what its earlier processes had spent up to their last checkpoint (what a killed process
    spent after it is not counted)."""

    def __init__(self) -> None:
        self.start = self.last = (time.perf_counter(), time.process_time())
        self.parts: dict[str, float] = {}
        self.carried: dict[str, float] = {}

    def lap(self, part: str) -> None:
        now = (time.perf_counter(), time.process_time())
        for unit, before, after in (("wall", self.last[0], now[0]), ("cpu", self.last[1], now[1])):
            key = f"{part}_{unit}"
            self.parts[key] = self.parts.get(key, 0.0) + after - before
        self.last = now

    def carry(self, seconds: dict[str, float]) -> None:
        """Count an earlier process's seconds (its seconds() at its last checkpoint) in this one's."""
        self.carried = dict(seconds)

    def seconds(self) -> dict[str, float]:
        now = {"wall": time.perf_counter() - self.start[0], "cpu": time.process_time() - self.start[1], **self.parts}
        return {key: now.get(key, 0.0) + self.carried.get(key, 0.0) for key in {*now, *self.carried}}


def bundle_settings(bundle: Path) -> dict:
    """What made the bundle (its report's settings that matter here), {} where it has no report."""
    from quailora_convert.bundle.layout import REPORT

    path = bundle / REPORT
    if not path.is_file():
        return {}
    settings = json.loads(path.read_text()).get("settings", {})
    keys = ("bits", "rank", "lora_alpha", "use_rslora", "lora_split", "solver", "als_steps", "rounding", "refine",
            "num_samples", "seq_len", "seed", "calib")
    return {k: settings[k] for k in keys if k in settings}


def base_compute_dtype(model) -> str | None:
    for module in model.modules():
        dtype = getattr(module, "compute_dtype", None)
        if dtype is not None:
            return str(dtype).removeprefix("torch.")
    return None


def versions() -> dict:
    import bitsandbytes
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__}


# ---- run files: one per (label, seed), skipped when present, a lock while running

def run_path(out: Path, label: str, seed: int) -> Path:
    return out / RUNS / label / f"seed-{seed}.json"


def same_norms(saved: dict, now: dict) -> bool:
    """The init's norms as a run file holds them against a fresh load's, to 1e-9 (float64 sums may differ in the
    last bits with the thread count)."""
    return saved.keys() == now.keys() and all(
        saved[kind].keys() == now[kind].keys()
        and all(math.isclose(saved[kind][k], now[kind][k], rel_tol=1e-9, abs_tol=1e-12) for k in now[kind])
        for kind in now)


def partial_path(out: Path, label: str, seed: int) -> Path:
    """The folder of a run that is under way: the Trainer's last checkpoint and progress.json (what was measured)."""
    return out / RUNS / label / f"seed-{seed}.partial"


class PartialRun:
    """A run under way, kept at each measured step so that a killed process loses at most one curve interval.

    The Trainer writes checkpoint-N (adapter, optimizer, scheduler, RNG states); then progress.json is replaced
    whole, naming N; then older checkpoints are removed. progress.json therefore always names a checkpoint that
    is complete; a checkpoint it does not name is unfinished or superseded. The folder is this script's own: it
    is removed when the run's file is written."""

    PROGRESS = "progress.json"

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def checkpoint(self, step: int) -> Path:
        return self.folder / f"checkpoint-{step}"

    def progress(self, spec: RunSpec, seed: int, protocol: dict, init_norms: dict,
                 micro_batch: int | None = None) -> dict | None:
        """The saved progress of this very run (same init, seed, protocol), None when there is none; refused when
        the folder holds another run's or the init no longer matches (the bundle changed since)."""
        path = self.folder / self.PROGRESS
        if not path.is_file():
            return None
        saved = read_run(path)
        check_same_run(saved, spec, protocol, path)
        if micro_batch is not None and saved.get("micro_batch", micro_batch) != micro_batch:
            raise SystemExit(f"{path}: was run with --micro-batch {saved.get('micro_batch')}, not {micro_batch} (another "
                             f"batching, other numbers); run it with that, or remove {self.folder} to start over")
        if saved.get("seed") != seed:
            raise SystemExit(f"{path}: holds seed {saved.get('seed')}, not {seed}; remove {self.folder} to start over")
        if not same_norms(saved.get("init_norms", {}), init_norms):
            raise SystemExit(f"{path}: the init differs from the one this run started from (was the bundle "
                             f"converted again?); remove {self.folder} to start the run over")
        if not (self.checkpoint(saved["step"]) / "trainer_state.json").is_file():
            raise SystemExit(f"{path}: names {self.checkpoint(saved['step'])}, which is not there; remove "
                             f"{self.folder} to start the run over")
        return saved

    def commit(self, step: int, progress: dict) -> None:
        """Record progress at step, whose checkpoint the Trainer has just written; drop the checkpoints before it."""
        replace_text(self.folder / self.PROGRESS, json.dumps({**progress, "step": step}, indent=2))
        for old in self.folder.glob("checkpoint-*"):
            if old.name != self.checkpoint(step).name:
                shutil.rmtree(old)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def read_run(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path}: not a run file ({e}); move it away to run it again") from e


def check_same_run(existing: dict, spec: RunSpec, protocol: dict, path: Path) -> None:
    """A present run file counts only if it is this run under this protocol; anything else is refused."""
    if (existing.get("kind") != spec.kind or Path(existing.get("bundle", "")) != spec.bundle
            or existing.get("adapter_dtype", "float32") != spec.adapter_dtype):
        raise SystemExit(f"{path}: label {spec.label!r} was run as {existing.get('kind')} from "
                         f"{existing.get('bundle')} with {existing.get('adapter_dtype', 'float32')} factors; give "
                         f"this one another label, or another --out")
    differs = sorted(k for k in set(protocol) | set(existing.get("protocol", {}))
                     if protocol.get(k) != existing.get("protocol", {}).get(k))
    if differs:
        raise SystemExit(f"{path}: made under another protocol ({', '.join(differs)} differ); use another --out")


def take_lock(path: Path) -> bool:
    """Hold path.lock for this process; False when a live process on this machine holds it."""
    lock = path.with_name(path.name + ".lock")
    host = socket.gethostname()
    while True:
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, json.JSONDecodeError):
                return False  # being written by its holder this instant
            if holder.get("host") == host and not _alive(holder.get("pid", -1)):
                lock.unlink(missing_ok=True)  # left by a process that died: take it over
                continue
            return False
        with os.fdopen(handle, "w") as f:
            json.dump({"pid": os.getpid(), "host": host}, f)
        return True


def release_lock(path: Path) -> None:
    path.with_name(path.name + ".lock").unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def replace_text(path: Path, text: str) -> None:
    """Write path whole or not at all: a .tmp file of this process, then renamed over it."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_atomically(path: Path, record: dict) -> None:
    replace_text(path, json.dumps(record, indent=2))


def run_all(specs: list[RunSpec], seeds: list[int], study: Study, stop_after: int | None = None) -> tuple[int, int]:
    """(runs done now, runs skipped): each (spec, seed) whose file is missing, in seed-major order; a run under way
    (its partial folder) goes on from its last checkpoint; with stop_after, runs stop at their first checkpoint at or
    after that step instead of finishing."""
    done = skipped = 0
    for seed in seeds:
        for spec in specs:
            path = run_path(study.out, spec.label, seed)
            if path.exists():
                check_same_run(read_run(path), spec, study.protocol, path)
                PartialRun(partial_path(study.out, spec.label, seed)).remove()  # left by a kill after the file
                print(f"{spec.label} seed {seed}: skipped, {path} is there", flush=True)
                skipped += 1
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            if not take_lock(path):
                print(f"{spec.label} seed {seed}: skipped, another process is running it", flush=True)
                skipped += 1
                continue
            try:
                record = train_one(spec, seed, study, stop_after)
                if record is not None:
                    write_atomically(path, record)
                    PartialRun(partial_path(study.out, spec.label, seed)).remove()
            finally:
                release_lock(path)
            if record is None:
                print(f"{spec.label} seed {seed}: stopped at step {stop_after} or the checkpoint after it; the same "
                      f"command goes on from there", flush=True)
                skipped += 1
                continue
            print(f"{spec.label} seed {seed}: done in {record['seconds']['cpu']:.0f} CPU s "
                  f"({record['seconds']['wall']:.0f} s wall) -> {path}", flush=True)
            done += 1
    return done, skipped


# ---- the report: built from whatever run files are there

def load_runs(out: Path) -> list[dict]:
    return [read_run(p) for p in sorted((out / RUNS).glob("*/seed-*.json"))]


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def gap_closed(init: float, plain: float, int8: float) -> float | None:
    """(plain - init) / (plain - int8): 0 at plain QLoRA, 1 at int8 QLoRA; None when the two references tie."""
    return (plain - init) / (plain - int8) if plain != int8 else None


def reference_label(runs: list[dict], kind: str, wanted: str | None) -> str | None:
    """The label runs are compared against: wanted, else the one label of that kind (None when not one)."""
    labels = {r["label"] for r in runs if r["kind"] == kind}
    if wanted is not None:
        return wanted if any(r["label"] == wanted for r in runs) else None
    return labels.pop() if len(labels) == 1 else ("plain" if kind == "plain" and "plain" in labels else None)


def summarise(runs: list[dict], plain_label: str | None = None, int8_label: str | None = None) -> dict:
    """Per label: mean and spread of both perplexities per checkpoint, the gap closed per seed (paired with the
    plain and int8 runs of the same seed) then averaged, whether it beats plain QLoRA at every checkpoint of
    every paired run, forgetting against plain, the early gradient norm, the factor norms and the distance moved."""
    protocols = {json.dumps(r["protocol"], sort_keys=True) for r in runs}
    if len(protocols) > 1:
        raise SystemExit("the run files were made under different protocols; report them from separate --out")
    plain_label = reference_label(runs, "plain", plain_label)
    int8_label = reference_label(runs, "int8", int8_label)
    by_label: dict[str, dict[int, dict]] = {}
    for run in runs:
        by_label.setdefault(run["label"], {})[run["seed"]] = run
    plain, int8 = by_label.get(plain_label, {}), by_label.get(int8_label, {})
    inits = {}
    for label, seeded in by_label.items():
        inits[label] = _summarise_label(seeded, plain, int8, label == plain_label)
    return {"protocol": runs[0]["protocol"] if runs else {}, "plain": plain_label, "int8": int8_label,
            "inits": inits, "cpu_seconds": sum(r["seconds"]["cpu"] for r in runs), "runs": len(runs)}


def _summarise_label(seeded: dict[int, dict], plain: dict[int, dict], int8: dict[int, dict], is_plain: bool) -> dict:
    first = next(iter(seeded.values()))
    steps = [p["step"] for p in first["curve"]]
    seeds = sorted(seeded)
    curves = {name: [_spread([seeded[s]["curve"][i][name] for s in seeds]) for i in range(len(steps))]
              for name in ("task", "forget")}
    paired = [s for s in seeds if s in plain and s in int8]
    gaps = [[gap_closed(seeded[s]["curve"][i]["task"], plain[s]["curve"][i]["task"], int8[s]["curve"][i]["task"])
             for s in paired] for i in range(len(steps))]
    gap_curve = [_spread([g for g in at_step if g is not None]) if any(g is not None for g in at_step) else None
                 for at_step in gaps]
    against_plain = [s for s in seeds if s in plain]
    beats = None
    if against_plain and not is_plain:
        wins = [seeded[s]["curve"][i]["task"] < plain[s]["curve"][i]["task"]
                for s in against_plain for i in range(len(steps))]
        beats = {"every": all(wins), "won": sum(wins), "of": len(wins)}
    forget_vs_plain = None
    if against_plain and not is_plain:
        forget_vs_plain = _spread([seeded[s]["curve"][-1]["forget"] - plain[s]["curve"][-1]["forget"]
                                   for s in against_plain])
    early = [seeded[s]["grad_norm_first"]["mean"] for s in seeds if seeded[s]["grad_norm_first"]["mean"] is not None]
    final_distance = [seeded[s]["curve"][-1].get("distance", {}).get("all", {}) for s in seeds]
    relative = [d["relative"] for d in final_distance if d.get("relative") is not None]
    return {
        "kind": first["kind"], "bundle": first["bundle"], "bundle_settings": first.get("bundle_settings", {}),
        "adapter_dtype": first.get("adapter_dtype", "float32"),
        "seeds": seeds, "paired_seeds": paired, "steps": steps, "task": curves["task"], "forget": curves["forget"],
        "gap_closed": gap_curve, "beats_plain": beats,
        "forget_rise": _spread([seeded[s]["curve"][-1]["forget"] - seeded[s]["curve"][0]["forget"] for s in seeds]),
        "forget_final_minus_plain": forget_vs_plain,
        "grad_norm_first": _spread(early) if early else None,
        "init_norms": {k: statistics.fmean(seeded[s]["init_norms"]["all"][k] for s in seeds)
                       for k in ("A", "B", "scaled_BA")},
        "distance_final": {"absolute": statistics.fmean(d["absolute"] for d in final_distance if d),
                           "relative": statistics.fmean(relative) if relative else None},
        "cpu_seconds": _spread([seeded[s]["seconds"]["cpu"] for s in seeds]),
        "wall_seconds": _spread([seeded[s]["seconds"]["wall"] for s in seeds]),
    }


def _cell(spread: dict | None, digits: int = 3, percent: bool = False) -> str:
    if spread is None:
        return "—"
    scale, unit = (100, "%") if percent else (1, "")
    text = f"{spread['mean'] * scale:.{digits}f}{unit}"
    return text + (f" ± {spread['std'] * scale:.{digits}f}" if spread["n"] > 1 else "")


def markdown(summary: dict) -> str:
    """The after-training table and the diagnostics table."""
    inits = summary["inits"]
    if not inits:
        return "no runs yet\n"
    steps = next(iter(inits.values()))["steps"]
    protocol = summary["protocol"]
    lines = [f"Held-out {Path(protocol.get('data', '?')).name} perplexity (mean ± std over seeds), "
             f"{protocol.get('steps')} steps, batch {TOTAL_BATCH}, records cut to {protocol.get('max_len')} tokens; "
             f"gap closed = (plain − init) / (plain − int8) per seed (paired), then averaged; plain: "
             f"{summary['plain']}, int8: {summary['int8']}.", "",
             "| init | seeds | " + " | ".join(f"step {s}" for s in steps)
             + " | gap closed at init | gap closed after training | beats plain at every checkpoint "
               "| forget ppl after | forget − plain's |",
             "| --- | --- | " + " | ".join("---" for _ in steps) + " | --- | --- | --- | --- | --- |"]
    for label, row in inits.items():
        beats = row["beats_plain"]
        beats_text = "—" if beats is None else f"{'yes' if beats['every'] else 'no'} ({beats['won']}/{beats['of']})"
        lines.append(f"| {label} | {len(row['seeds'])} | " + " | ".join(_cell(p) for p in row["task"])
                     + f" | {_cell(row['gap_closed'][0], 1, True)} | {_cell(row['gap_closed'][-1], 1, True)}"
                     + f" | {beats_text} | {_cell(row['forget'][-1])} | {_cell(row['forget_final_minus_plain'])} |")
    lines += ["", "| init | made with | ‖A‖ at init | ‖B‖ at init | ‖s B A‖ at init | grad norm, first "
              f"{GRAD_NORM_STEPS} steps | ‖s (BA − B0A0)‖ after | relative to ‖s B0A0‖ | CPU s per run |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, row in inits.items():
        norms, distance = row["init_norms"], row["distance_final"]
        relative = "—" if distance["relative"] is None else f"{distance['relative']:.3f}"
        lines.append(f"| {label} | {_made_with(row)} | {norms['A']:.2f} | {norms['B']:.2f} | {norms['scaled_BA']:.3f} "
                     f"| {_cell(row['grad_norm_first'])} | {distance['absolute']:.3f} | {relative} "
                     f"| {_cell(row['cpu_seconds'], 0)} |")
    lines += ["", f"{summary['runs']} runs, {summary['cpu_seconds']:.0f} CPU seconds in all."]
    return "\n".join(lines) + "\n"


def _made_with(row: dict) -> str:
    s = row["bundle_settings"]
    if row["kind"] == "int8":
        return "int8 base, PEFT default init"
    base = f"{s.get('rounding', '?')}" + (f" refine {s['refine']}" if s.get("refine") else "")
    adapter = "PEFT default init" if row["kind"] == "plain" else (
        f"{s.get('solver', '?')}" + (f"-{s.get('als_steps')}" if s.get("solver") == "als" else "")
        + (f", split {s['lora_split']}" if s.get("lora_split", "balanced") != "balanced" else ""))
    factors = "" if row.get("adapter_dtype", "float32") == "float32" else f", {row['adapter_dtype']} factors"
    return f"{base} + {adapter}, {s.get('num_samples', '?')} calib{factors}"


def plot(summary: dict, path: Path) -> None:
    """Mean held-out perplexity per init with a min-max band over seeds: the task's text and the forgetting text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, name, title in ((axes[0], "task", "held-out task text"), (axes[1], "forget", "forgetting text")):
        for label, row in summary["inits"].items():
            mean = [p["mean"] for p in row[name]]
            line, = ax.plot(row["steps"], mean, marker="o", label=f"{label} ({len(row['seeds'])} seeds)")
            if len(row["seeds"]) > 1:
                ax.fill_between(row["steps"], [p["min"] for p in row[name]], [p["max"] for p in row[name]],
                                color=line.get_color(), alpha=0.2)
        ax.set_xlabel(f"optimizer step (batch {TOTAL_BATCH})")
        ax.set_ylabel("perplexity")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.suptitle("QLoRA fine-tuning: mean and min-max over seeds")
    fig.tight_layout()
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)


def write_report(out: Path, plain_label: str | None = None, int8_label: str | None = None) -> dict:
    runs = load_runs(out)
    summary = summarise(runs, plain_label, int8_label)
    table = markdown(summary)
    replace_text(out / "report.md", table)  # another process may be writing its report: whole files only
    replace_text(out / "report.json", json.dumps(summary, indent=2))
    if runs:
        plot(summary, out / "finetune.png")
    print(table)
    return summary


# ---- the command line

class InOrder(argparse.Action):
    """--bundle, --plain and --int8 into one list of (kind, value), in the order given: the order runs are done in."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.inits = [*(getattr(namespace, "inits", None) or []), (self.dest, value)]


def run_specs(inits: list[tuple[str, str]]) -> list[RunSpec]:
    """The runs the --bundle/--plain/--int8 options name; int8 takes its LoraConfig from the first bundle given."""
    specs, int8_labels = [], []
    for kind, value in inits:
        if kind == "int8":
            int8_labels.append(value)
            specs.append(None)
            continue
        label, sep, path = value.partition("=")
        if not sep or not Path(path).is_dir():
            raise SystemExit(f"expected LABEL=BUNDLE_FOLDER, got {value!r}")
        specs.append(RunSpec(label, kind, Path(path).resolve()))
    first = next((s.bundle for s in specs if s is not None), None)
    if first is None:
        raise SystemExit("give at least one --bundle or --plain")
    labels = iter(int8_labels)
    return [s if s is not None else RunSpec(next(labels), "int8", first) for s in specs]


def with_adapter_dtypes(specs: list[RunSpec], values: list[str], p: argparse.ArgumentParser) -> list[RunSpec]:
    """specs with the --adapter-dtype LABEL=DTYPE choices applied."""
    chosen = {}
    for value in values:
        label, _, dtype = value.partition("=")
        if dtype not in ADAPTER_DTYPES:
            p.error(f"--adapter-dtype {value}: give LABEL=DTYPE, DTYPE one of {', '.join(ADAPTER_DTYPES)}")
        chosen[label] = dtype
    unknown = set(chosen) - {s.label for s in specs}
    if unknown:
        p.error(f"--adapter-dtype {', '.join(sorted(unknown))}: no such label")
    return [replace(s, adapter_dtype=chosen.get(s.label, s.adapter_dtype)) for s in specs]


def add_init_options(p: argparse.ArgumentParser) -> None:
    """--source, --bundle, --plain and --int8: the inits, in the order given (run_specs reads them)."""
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="the full-precision model (for --int8)")
    p.add_argument("--bundle", action=InOrder, help="LABEL=PATH: the bundle's own init")
    p.add_argument("--plain", action=InOrder, help="LABEL=PATH: the bundle's base, PEFT's default init")
    p.add_argument("--int8", action=InOrder, nargs="?", const="int8", metavar="LABEL",
                   help="int8 QLoRA from --source (label: int8), with the first bundle's LoraConfig")
    p.add_argument("--adapter-dtype", action="append", default=[], metavar="LABEL=DTYPE",
                   help="train LABEL's LoRA factors in DTYPE (bfloat16; default float32)")


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_init_options(p)
    p.add_argument("--only", action="append", default=[], metavar="LABEL", help="run only these labels")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, default=1, help="seeds 0 .. N-1")
    seeds.add_argument("--seed-list", type=lambda s: [int(x) for x in s.split(",")], help="e.g. 0,1,2")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--eval-records", type=int, default=64)
    p.add_argument("--split-seed", type=int, default=42, help="the shuffle that holds --eval-records out")
    p.add_argument("--forget-data", type=Path, default=DEFAULT_CALIB)
    p.add_argument("--forget-records", type=int, default=64)
    p.add_argument("--forget-calib-samples", type=int, default=128, help="the calibration draw to keep out of it")
    p.add_argument("--forget-calib-seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--micro-batch", type=int, default=4, help="per-step batch; accumulation makes it 16")
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's own)")
    p.add_argument("--no-gradient-checkpointing", dest="checkpointing", action="store_false",
                   help="prepare_model_for_kbit_training(use_gradient_checkpointing=False): same math, less CPU")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                   help="stop each run at its first checkpoint at or after STEP (kept; the same command resumes it)")
    p.add_argument("--out", type=Path, required=True)
    return p


def report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finetune.py report", description="Table and plot from the run files in --out.")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--plain-label", default=None, help="the plain QLoRA runs (default: the label 'plain')")
    p.add_argument("--int8-label", default=None, help="the int8 QLoRA runs (default: the one --int8 label)")
    return p


def main(argv: list[str]) -> int:
    if argv[:1] == ["report"]:
        args = report_parser().parse_args(argv[1:])
        write_report(args.out, args.plain_label, args.int8_label)
        return 0
    p = run_parser()
    args = p.parse_args(argv)
    if TOTAL_BATCH % args.micro_batch:
        p.error(f"--micro-batch must divide {TOTAL_BATCH}")
    specs = with_adapter_dtypes(run_specs(getattr(args, "inits", None) or []), args.adapter_dtype, p)
    bad = [s.label for s in specs if not LABEL_PATTERN.match(s.label)]
    if bad or len({s.label for s in specs}) < len(specs):
        p.error(f"labels must be distinct folder names (letters, digits, . _ -): {bad or [s.label for s in specs]}")
    unknown = set(args.only) - {s.label for s in specs}
    if unknown:
        p.error(f"--only {', '.join(sorted(unknown))}: no such label")
    selected = [s for s in specs if not args.only or s.label in args.only]
    seeds = args.seed_list if args.seed_list is not None else list(range(args.seeds))

    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch is imported
    import torch
    from transformers import AutoTokenizer

    from quailora_convert.calibration.batches import pad_token_id

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device != "cpu" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here")
    tokenizer = AutoTokenizer.from_pretrained(specs[0].bundle)
    train_texts, eval_texts = split_records(args.data, args.eval_records, args.split_seed)
    forget = forget_texts(args.forget_data, args.forget_records, args.forget_calib_samples, args.forget_calib_seed)
    protocol = {"data": str(args.data.resolve()), "eval_records": args.eval_records, "split_seed": args.split_seed,
                "forget_data": str(args.forget_data.resolve()), "forget_records": args.forget_records,
                "forget_calib_samples": args.forget_calib_samples, "forget_calib_seed": args.forget_calib_seed,
                "max_len": args.max_len, "steps": args.steps, "total_batch": TOTAL_BATCH, "lr": LEARNING_RATE,
                "warmup_ratio": WARMUP_RATIO, "schedule": "linear", "optimizer": "adamw_torch",
                "max_grad_norm": MAX_GRAD_NORM, "checkpoints": [0, *checkpoints(args.steps)],
                "source": str(args.source.resolve())}
    study = Study(protocol, tokenized(tokenizer, train_texts, args.max_len),
                  {"task": tokenized(tokenizer, eval_texts, args.max_len),
                   "forget": tokenized(tokenizer, forget, args.max_len)},
                  pad_token_id(tokenizer), args.source, args.device, args.checkpointing, args.micro_batch,
                  args.eval_batch, args.threads, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    done, skipped = run_all(selected, seeds, study, args.stop_after)
    print(f"{done} runs done, {skipped} skipped", flush=True)
    write_report(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
