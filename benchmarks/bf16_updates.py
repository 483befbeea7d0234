"""How much of each init a bfloat16 weight cannot move: the share of LoRA factor entries on which an update of
size u rounds away (bf16(w + u) == w and bf16(w - u) == w), for the update sizes Adam takes at the study's lr.

Adam's update on an entry is about lr while its gradient keeps its sign (less later), whatever the entry's size;
bfloat16 keeps 8 significant bits, so an entry larger than 256 u to 512 u cannot take a step of u. Where the factors
train in bfloat16 (transformers' load_adapter on a 4-bit model leaves them there; TRL's SFTTrainer casts them), an
init with large factors is partly frozen. Each init is loaded as benchmarks/finetune.py loads it (float32 factors),
then the share is measured on its factors rounded to bfloat16:

    python benchmarks/bf16_updates.py --plain plain=$B/nearest-exact --bundle nearest-exact=$B/nearest-exact \
        --bundle gptq-r4=$B/gptq-r4 --out bf16_updates.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from finetune import add_init_options, load_model, lora_factors, replace_text, run_specs

UPDATES = (2e-4, 1e-4, 2e-5)  # the study's peak lr, half of it, a tenth of it


def lost_update_share(weights: torch.Tensor, update: float) -> float:
    """The share of entries of weights (any shape) that bfloat16 cannot move by +update nor by -update."""
    w = weights.detach().to(torch.bfloat16).float()
    up = (w + update).to(torch.bfloat16).float() == w
    down = (w - update).to(torch.bfloat16).float() == w
    return float((up & down).float().mean())


def init_row(factors: dict[str, tuple]) -> dict[str, float]:
    """Over all factor entries of an init (lora_factors' (A, B, scaling) per module): lost_update_share per update,
    and the largest entry."""
    entries = torch.cat([t.flatten() for A, B, _ in factors.values() for t in (A, B)])
    return {**{f"{u:g}": lost_update_share(entries, u) for u in UPDATES}, "max_entry": float(entries.abs().max())}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_init_options(p)
    p.add_argument("--seed", type=int, default=0, help="torch's seed before each load (PEFT's random lora_A)")
    p.add_argument("--out", type=Path, required=True, help="the JSON of the table")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    rows = {}
    for spec in run_specs(getattr(args, "inits", None) or []):
        torch.manual_seed(args.seed)
        model = load_model(spec, args.source, "cpu", checkpointing=False)
        rows[spec.label] = {"kind": spec.kind, "bundle": str(spec.bundle), **init_row(lora_factors(model))}
        del model
    args.out.parent.mkdir(parents=True, exist_ok=True)
    replace_text(args.out, json.dumps({"updates": list(UPDATES), "rows": rows}, indent=2))
    print("| init | " + " | ".join(f"entries bf16 cannot move by {u:g}" for u in UPDATES) + " | largest entry |")
    print("| --- " * (len(UPDATES) + 2) + "|")
    for label, row in rows.items():
        print(f"| {label} | " + " | ".join(f"{row[f'{u:g}']:.1%}" for u in UPDATES) + f" | {row['max_entry']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
