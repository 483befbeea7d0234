"""`quailora-convert inspect DIR`: what a bundle is, from its report (no tensors are loaded)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from quailora_cli.app import app
from quailora_convert.bundle.layout import CARD


@app.command("inspect")
def inspect_bundle(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder written by quailora-convert.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Show a bundle's source, quantization, LoRA settings, solver, calibration, error report and eval.

    An incomplete or damaged bundle is still shown (what its JSON files say), then refused: one error
    line naming what is missing or broken, exit 2.
    """
    from quailora_convert.bundle.read import describe_bundle, verify_bundle

    info = describe_bundle(bundle)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        for label, value in summary_lines(info):
            typer.echo(f"{label + ':':<14}{value}")
    verify_bundle(bundle)  # reads JSON files and safetensors headers only


def summary_lines(info: dict) -> list[tuple[str, str]]:
    source, quant, lora, solver = info["source"], info["quantization"], info["lora"], info["solver"]
    calib, error, evaluation = info["calibration"], info["error"], info["eval"]
    rslora = ", rsLoRA" if lora["use_rslora"] else ""
    reduction = "n/a" if error["reduction"] is None else f"{error['reduction']:.1%}"
    lines = [
        ("bundle", info["bundle"] + ("" if info["complete"] else f"  (INCOMPLETE: missing {', '.join(info['missing'])})")),
        ("source", (source["repo_id"] or source["model"] or "?") + (f" @ {source['commit']}" if source["commit"] else "")),
        ("quantization", f"{quant.get('type', '?')} ({quant.get('bits', '?')}-bit)"),
        ("lora", f"rank {lora['rank']}, alpha {lora['alpha']}{rslora}; targets "
                 f"{', '.join(lora['target_modules'] or []) or '?'}"),
        ("layout", f"quantized base at the root, adapter in {lora['folder']}/ (PeftModel.from_pretrained(base, DIR, "
                   f"subfolder=\"{lora['folder']}\"))"),
        ("solver", solver["name"] + (f" ({solver['als_steps']} steps)" if solver["als_steps"] is not None else "")),
        ("base", f"{info['base']['rounding']} rounding"
                 + ("" if info["base"].get("scales", "absmax") == "absmax" else " on calibrated NF4 block scales")
                 + (f", {info['base']['refine']} refinement round{'s' * (info['base']['refine'] != 1)}"
                    if info["base"]["refine"] else "")),
        ("calibration", f"{calib['samples']} samples, {calib['tokens']} tokens from {calib['data']} "
                        f"(seq-len {calib['seq_len']}, seed {calib['seed']})"),
        ("error", f"{error['modules']} modules, calibrated error {reduction} lower than plain quantization"),
        ("versions", ", ".join(f"{k} {v}" for k, v in info["versions"].items())),
    ]
    if evaluation:
        rows = ", ".join(f"{r['model']} {r['perplexity']:.3f}" for r in evaluation.get("rows", []))
        gap = evaluation.get("gap_closed")
        lines.append(("eval", f"perplexity {rows}" + (f"; gap closed {gap:.1%}" if gap is not None else "")))
    else:
        lines.append(("eval", "none (run `quailora-convert eval DIR`)"))
    lines.append(("model card", CARD if info["card"] else "none"))
    return lines
