"""`quailora-convert [convert] MODEL ...`: the conversion command."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from quailora_cli.app import app


@app.command()
def convert(
    model: Annotated[str, typer.Argument(help=(
        "Local folder of safetensors shards, a Hub model id, or a .gguf file (dequantized by transformers and "
        "materialised in full in a temporary folder: not streamed, needs the model's float32 size in memory)."))],
    calib: Annotated[str, typer.Option("--calib", help=(
        "Calibration data: a preset (alpaca, chip2, self-instruct, hh-rlhf, slimorca: the paper's sets, from the "
        "Hub), a Hub dataset id org/name, or a local Alpaca .json/.jsonl, text .jsonl or .txt; 'self': data-free, "
        "text the model samples itself from built-in prompts (loads the whole model; refused above 15B parameters)."))],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the bundle to.")],
    bits: Annotated[int, typer.Option("--bits", help="4 = NF4 (double quant, block 64), 8 = LLM.int8.")] = 4,
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank r.")] = 64,
    lora_alpha: Annotated[float, typer.Option("--lora-alpha", help="LoRA alpha.")] = 16.0,
    use_rslora: Annotated[bool, typer.Option("--use-rslora", help="Scale by alpha/sqrt(r) (rsLoRA).")] = False,
    solver: Annotated[str, typer.Option("--solver", help="exact (closed form), als (paper), svd (weight-space).")] = "exact",
    als_steps: Annotated[int, typer.Option("--als-steps", help="Alternating steps for --solver als.")] = 20,
    target_modules: Annotated[str, typer.Option("--target-modules", help="all-linear, or comma-separated names.")] = "all-linear",
    num_samples: Annotated[int, typer.Option("--num-samples", help=(
        "Calibration samples. The paper used 2000: ~16x the capture time and CPU activation memory "
        "(samples x seq-len x hidden x 4 bytes) of the default 128; the solve time does not change."))] = 128,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Max tokens per calibration sample (cost grows linearly).")] = 512,
    calib_split: Annotated[Optional[str], typer.Option("--calib-split", show_default="train",
                                                       help="Split of a Hub dataset or preset.")] = None,
    calib_field: Annotated[Optional[str], typer.Option("--calib-field", help=(
        "Text column of a Hub dataset; default: Alpaca columns, else 'text'."))] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Calibration samples per forward.")] = 8,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda:0, ...")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed of calibration sampling.")] = 0,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Hub branch, tag or commit.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out folder.")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Accept pickle-only (.bin) weights; unpickling can run code.")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run the model's own modeling code (auto_map).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the bundle's path.")] = False,
    run_eval: Annotated[bool, typer.Option("--eval", help="Then run `eval` on the bundle (see eval --help).")] = False,
    eval_data: Annotated[Optional[str], typer.Option("--eval-data", help="--data of --eval (default: self).")] = None,
    eval_num_samples: Annotated[int, typer.Option("--eval-num-samples", help="--num-samples of --eval.")] = 32,
    eval_seq_len: Annotated[int, typer.Option("--eval-seq-len", help="--seq-len of --eval.")] = 256,
) -> None:
    """Convert MODEL into a QLoRA bundle at --out."""
    from quailora_convert.pipeline import ConvertSettings, convert as run_convert

    targets = "all-linear" if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",") if t.strip()]
    settings = ConvertSettings(
        model=model, out=out, calib=calib, calib_split=calib_split, calib_field=calib_field,
        bits=bits, rank=rank, lora_alpha=lora_alpha, use_rslora=use_rslora,
        solver=solver, als_steps=als_steps, target_modules=targets, num_samples=num_samples, seq_len=seq_len,
        batch_size=batch_size, device=device, seed=seed, revision=revision, overwrite=overwrite,
        allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
    )
    from quailora_cli.progress import Reporter, choose_mode

    with Reporter(choose_mode(quiet)) as reporter:
        path = run_convert(settings, on_event=reporter)
    if run_eval:  # the bundle is complete; eval adds quailora_eval.json and re-renders the card
        from quailora_cli.evaluate import run_eval as evaluate_bundle
        from quailora_convert.evaluate import EvalSettings

        with Reporter(choose_mode(quiet)) as reporter:
            evaluate_bundle(EvalSettings(bundle=path, data=eval_data, num_samples=eval_num_samples,
                                         seq_len=eval_seq_len), reporter)
    if quiet:
        typer.echo(str(path))
        return
    typer.echo(f"bundle written to {path}")
