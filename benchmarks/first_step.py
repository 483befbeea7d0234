"""How far does each init's first Adam step move the weights? The scale half of issue 24's "why does it fade".

A LoRA module computes W = Q + s B A and trains A and B. Adam's first update of every factor entry is -lr g/(|g| + eps)
(its moments are g and g^2 after bias correction): about lr in size whatever the gradient's size, so the step it
makes on W, s (dB A + B dA) to first order, grows with the factors' norms. PEFT's default init (B = 0) moves W by
s dB A alone; an init whose factors are large moves it by more at the same lr: a larger effective learning rate,
which is one way an init's curve can differ from plain QLoRA's that has nothing to do with the error it cancels.
A per-unit-lr proxy, not the study's own step 1 (its warm-up starts at lr 0; later Adam steps divide running means,
still about lr per entry while a gradient keeps its sign; clipping at norm 1 does not change Adam's direction).

For every init (--bundle, --plain, --int8, loaded exactly as benchmarks/finetune.py loads them), one batch of
--batch training records (the first of the task's training split; a batch of 16 in micro-batches, as the study
trains) gives the gradient; reported per init, over all LoRA modules:
- ||A||, ||B||, ||s B A|| at init;
- ||dW|| / lr: the Frobenius norm of the first step's change of W per unit lr, s ||dB A + B dA||;
- its ratio to the first --plain init's (the reference), and the same for ||dB A|| and ||B dA|| separately;
- the first-order loss decrease per unit lr, sum |g_A| + sum |g_B| (what that step buys at first order).

    OMP_NUM_THREADS=2 python benchmarks/first_step.py --plain plain=/work/study/bundles/nearest-exact \\
        --bundle nearest-exact=/work/study/bundles/nearest-exact --int8 --out /work/study/first_step.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from finetune import (DEFAULT_DATA, TOTAL_BATCH, add_init_options, factor_norms, load_model, lora_factors,
                      product_norm_squared, replace_text, run_specs, split_records, summed_token_nll, tokenized)

ADAM_EPS = 1e-8  # adamw_torch's default


def accumulate_gradient(model, batch: list[list[int]], micro_batch: int, pad_id: int) -> float:
    """Backward over batch in micro-batches, every predicted token of the batch weighted alike (the Trainer's
    gradient accumulation with num_items_in_batch, as for a Llama model in transformers 5); the mean token loss."""
    from quailora_convert.calibration.batches import make_batches

    model.train()  # dropout is 0; never an eval-mode forward (bitsandbytes' CPU repack)
    model.zero_grad(set_to_none=True)
    groups = make_batches(batch, micro_batch, pad_id)
    tokens = sum(int(group.attention_mask[:, 1:].sum()) for group in groups)  # the predicted tokens
    total = 0.0
    for group in groups:
        summed, _ = summed_token_nll(model, group.input_ids, group.attention_mask)
        loss = summed / tokens
        loss.backward()
        total += float(loss.detach())
    return total


def adam_first_step(A, B, grad_A, grad_B, scaling: float) -> dict[str, float]:
    """Squared norms of the first Adam step on W per unit lr, and of its two parts; the first-order loss decrease.
    A (r, in), B (out, r) and their gradients, float64."""
    step_A = -grad_A / (grad_A.abs() + ADAM_EPS)  # (r, in)
    step_B = -grad_B / (grad_B.abs() + ADAM_EPS)  # (out, r)
    both = product_norm_squared(torch.cat([A, step_A]), torch.cat([step_B, B], dim=1))  # ||dB A + B dA||^2
    return {"step": scaling ** 2 * max(both, 0.0),
            "step_dB_A": scaling ** 2 * max(product_norm_squared(A, step_B), 0.0),
            "step_B_dA": scaling ** 2 * max(product_norm_squared(step_A, B), 0.0),
            "decrease": float(grad_A.abs().sum() + grad_B.abs().sum())}


def first_step(model) -> dict[str, float]:
    """Over all LoRA modules: the norms of adam_first_step (per unit lr) and the loss decrease per unit lr."""
    sums = {"step": 0.0, "step_dB_A": 0.0, "step_B_dA": 0.0, "decrease": 0.0}
    for module in model.modules():
        if "default" not in getattr(module, "lora_A", {}) or not hasattr(module, "scaling"):
            continue
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        parts = adam_first_step(a.detach().double(), b.detach().double(), a.grad.double(), b.grad.double(),
                                float(module.scaling["default"]))
        for key, value in parts.items():
            sums[key] += value
    return {"step_per_lr": math.sqrt(sums["step"]), "dB_A_per_lr": math.sqrt(sums["step_dB_A"]),
            "B_dA_per_lr": math.sqrt(sums["step_B_dA"]), "loss_decrease_per_lr": sums["decrease"]}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_init_options(p)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--eval-records", type=int, default=64, help="held out as benchmarks/finetune.py holds them out")
    p.add_argument("--split-seed", type=int, default=42)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=TOTAL_BATCH)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="torch's seed before each load (PEFT's random lora_A)")
    p.add_argument("--out", type=Path, required=True, help="the JSON of the table")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    specs = run_specs(getattr(args, "inits", None) or [])
    from transformers import AutoTokenizer

    from quailora_convert.calibration.batches import pad_token_id

    tokenizer = AutoTokenizer.from_pretrained(specs[0].bundle)
    train_texts, _ = split_records(args.data, args.eval_records, args.split_seed)
    batch = tokenized(tokenizer, train_texts[:args.batch], args.max_len)
    rows = {}
    for spec in specs:
        torch.manual_seed(args.seed)
        model = load_model(spec, args.source, "cpu", checkpointing=False)
        loss = accumulate_gradient(model, batch, args.micro_batch, pad_token_id(tokenizer))
        rows[spec.label] = {"kind": spec.kind, "bundle": str(spec.bundle), "loss": loss,
                            "init_norms": factor_norms(lora_factors(model))["all"], **first_step(model)}
        del model
    reference = next((r for r in rows.values() if r["kind"] == "plain"), None)
    for row in rows.values():
        for key in ("step_per_lr", "dB_A_per_lr", "B_dA_per_lr", "loss_decrease_per_lr"):
            row[f"{key}_vs_plain"] = row[key] / reference[key] if reference and reference[key] else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    replace_text(args.out, json.dumps({"batch": len(batch), "max_len": args.max_len, "seed": args.seed,
                                       "rows": rows}, indent=2))
    print(table(rows))
    return 0


def table(rows: dict[str, dict]) -> str:
    def ratio(value):
        return "—" if value is None else f"{value:.2f}x"

    lines = ["| init | ‖A‖ | ‖B‖ | ‖s B A‖ | loss | ‖dW‖/lr, first Adam step | vs plain | ‖s dB A‖/lr | ‖s B dA‖/lr "
             "| loss decrease per lr, vs plain |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, r in rows.items():
        n = r["init_norms"]
        lines.append(f"| {label} | {n['A']:.1f} | {n['B']:.1f} | {n['scaled_BA']:.2f} | {r['loss']:.4f} "
                     f"| {r['step_per_lr']:.1f} | {ratio(r['step_per_lr_vs_plain'])} | {r['dB_A_per_lr']:.1f} "
                     f"| {r['B_dA_per_lr']:.1f} | {ratio(r['loss_decrease_per_lr_vs_plain'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
