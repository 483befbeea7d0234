"""Fine-tune a quailora-convert bundle with TRL's SFTTrainer: QLoRA that starts from the QuAILoRA init.

    pip install "quailora-convert[trl]"
    python examples/finetune_trl.py smollm2-quailora --data alpaca_data.json --steps 200 --out smollm2-sft

The bundle is loaded the way PEFT's QLoRA recipe loads a LoftQ checkpoint: the quantized base from the bundle's
root, then its one adapter from the quailora_init/ subfolder, trainable. The adapter is handed to SFTTrainer as a
PeftModel, without a peft_config (TRL raises when given both; a peft_config with the bare base would train a
fresh, randomly initialised adapter instead of the QuAILoRA one).

What TRL 1.16.0 does with a PeftModel on a 4-bit base (trl/trainer/sft_trainer.py, SFTTrainer.__init__):
- no k-bit preparation of its own: older releases called prepare_model_for_kbit_training inside the trainer, which
  froze a PeftModel's adapter (trl#3926, fixed by trl#4081); trl#4704 moved it out to trl.experimental. So the
  prepare_model_for_kbit_training below is ours to call, and it runs once;
- with gradient checkpointing it calls model.enable_input_require_grads(); transformers 5 checkpoints with
  use_reentrant=False by default, which needs no more;
- it casts every trainable parameter of a quantized model to bfloat16 (the QLoRA paper's choice). That rounds the
  float32 QuAILoRA factors (the tiny test bundle's logits move by 3e-3) and so moves the start away from Q + M:
  this script puts the float32 values back right after the trainer is built, before the optimizer exists, so
  training starts from exactly the bundle's Q + M and the saved adapter is float32.

On CPU nothing here runs the model in eval mode: with bitsandbytes 0.50, an eval-mode forward of a 4-bit layer on
CPUs with AVX512-BF16 repacks its weights, and training after it is corrupted. So no evaluation during training
(eval_strategy="no"); measure afterwards in train mode under torch.no_grad() (LoRA dropout is 0), or on the
model `quailora-convert export --merged` writes.
"""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

ADAPTER_DIR = "adapter"  # under --out: the fine-tuned adapter, for `quailora-convert export`
ALPACA_COLUMNS = {"instruction", "output"}  # (+ optional "input") -> TRL's prompt/completion format
TRL_COLUMNS = [{"text"}, {"messages"}, {"prompt", "completion"}]  # formats SFTTrainer reads as they are


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("bundle", help="a quailora-convert bundle: a local folder or a Hub repo id")
    parser.add_argument("--data", required=True, help=(
        "training data: a local .json/.jsonl file (Alpaca instruction/input/output records, or TRL's text, "
        "messages or prompt/completion records) or a Hub dataset name"))
    parser.add_argument("--split", default="train", help="the Hub dataset's split (default: train)")
    parser.add_argument("--out", type=Path, required=True, help=f"output folder; the adapter goes to OUT/{ADAPTER_DIR}")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default: 200)")
    parser.add_argument("--lr", type=float, default=2e-4, help="learning rate (default: 2e-4, as QLoRA)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass (default: 4)")
    parser.add_argument("--grad-accum", type=int, default=4, help=(
        "forward passes per optimizer step (default: 4; the total batch is batch-size x grad-accum)"))
    parser.add_argument("--max-length", type=int, default=512,
                        help="tokens per sequence, longer ones cut (default: 512)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False, help=(
        "recompute activations in the backward pass: less memory, about 20%% slower (default: off)"))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to train (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="data order seed (default: 0)")
    return parser.parse_args(argv)


def check_inputs(args: argparse.Namespace) -> None:
    """One line and exit, before any model is loaded, for a damaged or old-layout local bundle or a used --out."""
    from quailora_convert.bundle.read import verify_bundle
    from quailora_convert.errors import BadInputError

    if Path(args.bundle).is_dir():  # otherwise a Hub repo id
        try:
            verify_bundle(Path(args.bundle))
        except BadInputError as e:
            raise SystemExit(str(e)) from e
    if (args.out / ADAPTER_DIR).exists():
        raise SystemExit(f"{args.out / ADAPTER_DIR} exists: give another --out (nothing is overwritten)")


def load_for_training(bundle: str, device: str):
    """(PeftModel with the bundle's one adapter, trainable; tokenizer): PEFT's QLoRA recipe on a bundle."""
    import torch
    from peft import PeftModel, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quailora_convert.bundle.layout import INIT_ADAPTER_DIR

    placement = {} if device == "cpu" else {"device_map": {"": device}}
    base = AutoModelForCausalLM.from_pretrained(bundle, dtype=torch.float32, **placement)
    # Freezes the base and upcasts its non-quantized weights; gradient checkpointing is left to the trainer.
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    model = PeftModel.from_pretrained(base, bundle, subfolder=INIT_ADAPTER_DIR, is_trainable=True)
    return model, AutoTokenizer.from_pretrained(bundle)


def load_dataset(data: str, split: str):
    """The records as a `datasets.Dataset` in a format SFTTrainer reads; Alpaca becomes prompt/completion."""
    import datasets

    path = Path(data)
    if path.suffix in (".json", ".jsonl"):
        if not path.is_file():
            raise SystemExit(f"--data {data}: no such file")
        records = datasets.load_dataset("json", data_files=str(path), split="train")
    else:
        records = datasets.load_dataset(data, split=split)
    columns = set(records.column_names)
    if ALPACA_COLUMNS <= columns:
        return records.map(alpaca_prompt_completion, remove_columns=records.column_names)
    if any(format_columns <= columns for format_columns in TRL_COLUMNS):
        return records
    raise SystemExit(f"--data {data}: columns {sorted(columns)}; expected Alpaca (instruction/input/output), "
                     "text, messages or prompt/completion")


def alpaca_prompt_completion(record: dict) -> dict:
    """The Alpaca prompt up to "### Response:" as the prompt (no loss on it), the output as the completion."""
    from quailora_convert.calibration.formats import format_alpaca

    return {"prompt": format_alpaca({**record, "output": ""}), "completion": record["output"]}


def training_config(args: argparse.Namespace):
    import torch
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(args.out), max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="linear",
        warmup_steps=0.03,  # a fraction of the steps, as QLoRA
        optim="adamw_torch", per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, max_length=args.max_length,
        # transformers 5 names it activation_checkpointing; TRL's gradient_checkpointing alias defaults to True
        activation_checkpointing=args.gradient_checkpointing,
        # bf16 autocast on a GPU that has it; float32 on CPU
        bf16=args.device == "cuda" and torch.cuda.is_bf16_supported(), use_cpu=args.device == "cpu",
        dataloader_pin_memory=args.device == "cuda",
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", seed=args.seed,
        data_seed=args.seed,
    )


def trainable_values(model) -> dict:
    """name -> a copy of each trainable parameter (the adapter's lora_A / lora_B), in its loaded dtype."""
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def restore_values(model, values: dict) -> None:
    """Puts the copies back into the same Parameter objects (SFTTrainer cast them to bfloat16)."""
    for name, param in model.named_parameters():
        if name in values:
            param.data = values[name]


def main(argv: list[str] | None = None, callbacks=()):
    """Trains, saves OUT/adapter, prints the next steps; returns the SFTTrainer (its state holds the loss log)."""
    from trl import SFTTrainer

    args = parse_args(argv)
    check_inputs(args)
    model, tokenizer = load_for_training(args.bundle, args.device)
    dataset = load_dataset(args.data, args.split)
    adapter = trainable_values(model)
    trainer = SFTTrainer(model=model, args=training_config(args), train_dataset=dataset, processing_class=tokenizer,
                         callbacks=list(callbacks))
    restore_values(trainer.model, adapter)  # float32 QuAILoRA factors: the start is exactly the bundle's Q + M
    trainer.train()
    saved = args.out / ADAPTER_DIR
    trainer.model.save_pretrained(saved)
    print(next_steps(args.bundle, saved))
    return trainer


def next_steps(bundle: str, adapter: Path) -> str:
    b, a, parent = shlex.quote(str(bundle)), shlex.quote(str(adapter)), adapter.parent
    return "\n".join([
        f"fine-tuned adapter saved to {adapter}",
        "next:",
        f"  quailora-convert export {a} --bundle {b} --merged {shlex.quote(str(parent / 'merged'))}"
        "   # a full-precision model that plain transformers loads",
        f"  quailora-convert export {a} --bundle {b} --lora-for-source {shlex.quote(str(parent / 'lora-for-source'))}"
        "   # a LoRA for the original full-precision model",
        "  or keep training / serve it in 4-bit: PeftModel.from_pretrained(base, "
        f"{str(adapter)!r}) on AutoModelForCausalLM.from_pretrained({str(bundle)!r})",
    ])


if __name__ == "__main__":
    main()
