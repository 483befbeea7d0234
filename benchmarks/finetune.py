"""Does the QuAILoRA init still lead after fine-tuning? Held-out perplexity curves of QLoRA fine-tunes.

Runs (each a plain PEFT model trained by transformers' Trainer, nothing of ours in the loop):
- every --bundle LABEL=PATH: the bundle as a user loads it (AutoModelForCausalLM.from_pretrained(bundle)
  attaches its adapter; set_adapter makes it trainable): the QuAILoRA init on the bundle's base;
- --plain LABEL=PATH: that bundle's base with PEFT's default LoRA init (lora_A Kaiming-uniform, lora_B = 0,
  reset_lora_parameters): plain QLoRA on the same NF4 base;
- --int8: the source loaded with BitsAndBytesConfig(load_in_8bit=True) plus get_peft_model with the
  bundles' LoraConfig (int8 QLoRA, PEFT's default init).
Same data in the same order for every run (Trainer's seed and data_seed), the paper's hyperparameters:
lr 2e-4, AdamW (adamw_torch), warm-up 3% then linear decay, total batch 16 (--micro-batch x gradient
accumulation), LoRA dropout 0. Data: code_alpaca_2k.json formatted as Alpaca prompts, split once with
--seed into --eval-records held-out records and the rest for training, truncated to --max-len tokens.

Held-out perplexity is measured before training and every 1/5 of --steps, in train mode under
torch.no_grad() (dropout is 0, so train mode computes what eval mode does): on CPU, bitsandbytes 0.50
repacks 4-bit weights at the first eval-mode forward and training after it is corrupted, so nothing
here ever calls model.eval(). Writes --out/finetune.json and --out/finetune.png (matplotlib).

    python benchmarks/finetune.py --out /tmp/ft --steps 200 \\
        --bundle quailora=/tmp/qbundles/r64-exact --bundle best=/tmp/qbundles/r64-exact-gptq-refine2 \\
        --plain qlora=/tmp/qbundles/r64-exact --int8
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

from workplace import DEFAULT_SOURCE, SHARED

DEFAULT_DATA = SHARED / "data" / "calib" / "code_alpaca_2k.json"
TOTAL_BATCH = 16
CURVE_POINTS = 5


def split_records(path: Path, eval_records: int, seed: int) -> tuple[list[str], list[str]]:
    """(train texts, held-out texts): one shuffle with seed, the first eval_records held out."""
    from quailora_convert.calibration.formats import format_alpaca

    data = json.loads(path.read_text())
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    texts = [format_alpaca(data[i]) for i in order]
    return texts[eval_records:], texts[:eval_records]


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


def load_bundle(path: Path, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)  # transformers attaches the adapter
    model.set_adapter("default")  # ... frozen; this makes its LoRA weights (only them) trainable
    return model


def load_plain(path: Path, dtype):
    """The bundle's base with PEFT's own default LoRA init in place of the QuAILoRA factors."""
    model = load_bundle(path, dtype)
    reset = 0
    for module in model.modules():
        if hasattr(module, "reset_lora_parameters") and "default" in getattr(module, "lora_A", {}):
            module.reset_lora_parameters("default", True)
            reset += 1
    if not reset:
        raise SystemExit(f"{path}: no LoRA layer to re-initialise")
    return model


def load_int8(source: Path, bundle: Path, dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    adapter = json.loads((bundle / "adapter_config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype,
                                                 quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    config = LoraConfig(r=adapter["r"], lora_alpha=adapter["lora_alpha"], target_modules=adapter["target_modules"],
                        lora_dropout=0.0, use_rslora=adapter.get("use_rslora", False), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def check_dropout_is_zero(model, label: str) -> None:
    for module in model.modules():
        dropout = getattr(module, "lora_dropout", None)
        if dropout is not None and "default" in dropout and getattr(dropout["default"], "p", 0.0):
            raise SystemExit(f"{label}: LoRA dropout is {dropout['default'].p}; train-mode evaluation needs 0")


def train_one(label: str, model, train_ids, eval_ids, args, pad_id, out: Path) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from quailora_convert.calibration.batches import make_batches

    check_dropout_is_zero(model, label)
    curve_steps = sorted({round(args.steps * k / CURVE_POINTS) for k in range(1, CURVE_POINTS + 1)})
    curve = [{"step": 0, "ppl": heldout_perplexity(model, eval_ids, args.eval_batch, pad_id)}]
    print(f"{label}: step 0 held-out ppl {curve[0]['ppl']:.4f}", flush=True)
    losses: list[dict] = []

    class HeldOut(TrainerCallback):
        def on_step_end(self, training_args, state, control, model=None, **kwargs):
            if state.global_step in curve_steps:
                ppl = heldout_perplexity(model, eval_ids, args.eval_batch, pad_id)
                curve.append({"step": state.global_step, "ppl": ppl})
                print(f"{label}: step {state.global_step} held-out ppl {ppl:.4f}", flush=True)

        def on_log(self, training_args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append({"step": state.global_step, "loss": logs["loss"]})

    def collate(examples):
        [batch] = make_batches([e["input_ids"] for e in examples], len(examples), pad_id)
        ids, mask = batch.input_ids, batch.attention_mask
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    training = TrainingArguments(
        output_dir=str(out / "trainer" / label), max_steps=args.steps, learning_rate=2e-4, warmup_steps=0.03,  # a float: the fraction of steps
        lr_scheduler_type="linear", optim="adamw_torch", per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=TOTAL_BATCH // args.micro_batch, logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to=[], seed=args.seed, data_seed=args.seed, remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
    )
    dataset = [{"input_ids": ids} for ids in train_ids]
    started = time.perf_counter()
    Trainer(model=model, args=training, train_dataset=dataset, data_collator=collate, callbacks=[HeldOut()]).train()
    return {"curve": curve, "losses": losses, "train_seconds": time.perf_counter() - started}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, run in results["runs"].items():
        ax.plot([p["step"] for p in run["curve"]], [p["ppl"] for p in run["curve"]], marker="o", label=label)
    ax.set_xlabel("optimizer step (batch 16)")
    ax.set_ylabel("held-out perplexity (code_alpaca)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(f"QLoRA fine-tuning of {results['settings']['source_name']}, r={results['rank']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def labelled(values: list[str]) -> list[tuple[str, Path]]:
    pairs = []
    for value in values:
        label, sep, path = value.partition("=")
        if not sep or not Path(path).is_dir():
            raise SystemExit(f"expected LABEL=BUNDLE_FOLDER, got {value!r}")
        pairs.append((label, Path(path)))
    return pairs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="the full-precision model (for --int8)")
    p.add_argument("--bundle", action="append", default=[], help="LABEL=PATH: fine-tune from the bundle's init")
    p.add_argument("--plain", action="append", default=[], help="LABEL=PATH: the bundle's base, PEFT's default init")
    p.add_argument("--int8", action="store_true", help="also int8 QLoRA from --source")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--eval-records", type=int, default=64)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--micro-batch", type=int, default=4, help="per-step batch; accumulation makes it 16")
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if TOTAL_BATCH % args.micro_batch:
        p.error(f"--micro-batch must divide {TOTAL_BATCH}")
    bundles, plains = labelled(args.bundle), labelled(args.plain)
    if not bundles and not plains:
        p.error("give at least one --bundle or --plain")

    import torch
    from transformers import AutoTokenizer

    from quailora_convert.calibration.batches import pad_token_id

    first_bundle = (bundles or plains)[0][1]
    tokenizer = AutoTokenizer.from_pretrained(first_bundle)
    pad_id = pad_token_id(tokenizer)
    train_texts, eval_texts = split_records(args.data, args.eval_records, args.seed)
    train_ids, eval_ids = tokenized(tokenizer, train_texts, args.max_len), tokenized(tokenizer, eval_texts, args.max_len)
    args.out.mkdir(parents=True, exist_ok=True)
    rank = json.loads((first_bundle / "adapter_config.json").read_text())["r"]
    results = {"settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                            "source_name": args.source.name, "total_batch": TOTAL_BATCH, "lr": 2e-4,
                            "warmup_ratio": 0.03, "schedule": "linear", "optimizer": "adamw_torch"},
               "rank": rank, "data": {"train_records": len(train_ids), "eval_records": len(eval_ids),
                                      "eval_tokens": sum(len(s) - 1 for s in eval_ids)},
               "runs": {}}
    runs = [(label, lambda path=path: load_bundle(path, torch.float32)) for label, path in bundles]
    runs += [(label, lambda path=path: load_plain(path, torch.float32)) for label, path in plains]
    if args.int8:
        runs.append(("int8 QLoRA", lambda: load_int8(args.source, first_bundle, torch.float32)))
    for label, load in runs:
        torch.manual_seed(args.seed)
        model = load()
        results["runs"][label] = train_one(label, model, train_ids, eval_ids, args, pad_id, args.out)
        del model
        (args.out / "finetune.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "finetune.png")
    print_table(results)
    return 0


def print_table(results: dict) -> None:
    steps = [p["step"] for p in next(iter(results["runs"].values()))["curve"]]
    print("| init | " + " | ".join(f"step {s}" for s in steps) + " | train s |")
    print("| --- | " + " | ".join("---" for _ in steps) + " | --- |")
    for label, run in results["runs"].items():
        print(f"| {label} | " + " | ".join(f"{p['ppl']:.3f}" for p in run["curve"])
              + f" | {run['train_seconds']:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
