"""`quailora-convert [convert] MODEL ...`: the conversion command."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from quailora_cli.app import app


@app.command()
def convert(
    model: Annotated[str, typer.Argument(help="Local folder of safetensors shards, or a Hub model id.")],
    calib: Annotated[str, typer.Option("--calib", help="Calibration data: Alpaca .json/.jsonl, text .jsonl or .txt.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the bundle to.")],
    bits: Annotated[int, typer.Option("--bits", help="4 = NF4 (double quant, block 64), 8 = LLM.int8.")] = 4,
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank r.")] = 64,
    lora_alpha: Annotated[float, typer.Option("--lora-alpha", help="LoRA alpha.")] = 16.0,
    use_rslora: Annotated[bool, typer.Option("--use-rslora", help="Scale by alpha/sqrt(r) (rsLoRA).")] = False,
    solver: Annotated[str, typer.Option("--solver", help="exact (closed form), als (paper), svd (weight-space).")] = "exact",
    als_steps: Annotated[int, typer.Option("--als-steps", help="Alternating steps for --solver als.")] = 20,
    target_modules: Annotated[str, typer.Option("--target-modules", help="all-linear, or comma-separated names.")] = "all-linear",
    num_samples: Annotated[int, typer.Option("--num-samples", help="Calibration samples (paper: 2000).")] = 128,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Max tokens per calibration sample.")] = 512,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Calibration samples per forward.")] = 8,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda:0, ...")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed of calibration sampling.")] = 0,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Hub branch, tag or commit.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out folder.")] = False,
) -> None:
    """Convert MODEL into a QLoRA bundle at --out."""
    from quailora_convert.pipeline import ConvertSettings, convert as run_convert

    targets = "all-linear" if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",") if t.strip()]
    settings = ConvertSettings(
        model=model, out=out, calib=calib, bits=bits, rank=rank, lora_alpha=lora_alpha, use_rslora=use_rslora,
        solver=solver, als_steps=als_steps, target_modules=targets, num_samples=num_samples, seq_len=seq_len,
        batch_size=batch_size, device=device, seed=seed, revision=revision, overwrite=overwrite,
    )
    path = run_convert(settings, on_event=_print_event)
    typer.echo(f"bundle written to {path}")


def _print_event(event) -> None:
    data = event.data
    if event.kind == "resolved":
        typer.echo(f"model: {data['repo_id'] or data['folder']}" + (f" @ {data['commit']}" if data["commit"] else ""))
    elif event.kind == "calibrated":
        typer.echo(f"calibration: {data['samples']} samples captured in {data['seconds']:.1f}s")
    elif event.kind == "layer":
        typer.echo(f"layer {data['index'] + 1}/{data['count']} done in {data['seconds']:.1f}s")
    elif event.kind == "done":
        summary = data["report"]["summary"]
        typer.echo(f"{summary['modules']} modules: calibrated error {summary['relative_error_after']:.1%} of plain quantization")
