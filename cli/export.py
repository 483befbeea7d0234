"""`quailora-convert export ADAPTER --bundle DIR`: a fine-tuned adapter as a merged model or a LoRA for the source."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from quailora_cli.app import app
from quailora_cli.evaluate import VerboseOption
from quailora_convert.bundle.layout import DEFAULT_MAX_SHARD_BYTES, INIT_ADAPTER_DIR

MERGED_DTYPES = ("float32", "bfloat16", "float16")


@app.command("export")
def export_command(
    adapter: Annotated[Path, typer.Argument(help=(
        f"The fine-tuned adapter folder (model.save_pretrained of the bundle's {INIT_ADAPTER_DIR}/ after training)."))],
    bundle: Annotated[Path, typer.Option("--bundle", help="The bundle the adapter was fine-tuned from.")],
    merged: Annotated[Optional[Path], typer.Option("--merged", help=(
        "Write a full-precision checkpoint (the source's dtype, or --dtype) of dequant(Q) + the fine-tuned adapter "
        "here: what the fine-tuned QLoRA model computes, loaded by plain transformers."))] = None,
    lora_for_source: Annotated[Optional[Path], typer.Option("--lora-for-source", help=(
        "Write a LoRA adapter (rank 2r) for the original source model here: the fine-tuning's change alone, without "
        "the quantization correction."))] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help=(
        "dtype of the merged linears: float32, bfloat16 or float16 (default: the source's, as config.json says; "
        "computed in float32 and rounded once)."))] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=(
        "Replace an existing output folder (a checkpoint or adapter folder only)."))] = False,
    max_shard_bytes: Annotated[int, typer.Option("--max-shard-bytes", help=(
        "Start a new shard of the merged checkpoint once one holds this many bytes."))] = DEFAULT_MAX_SHARD_BYTES,
    verbose: VerboseOption = False,
) -> None:
    """Export ADAPTER, fine-tuned from --bundle, as --merged OUT and/or --lora-for-source OUT.

    The adapter is refused unless it was trained from the bundle's init adapter (same modules, shapes and
    settings, factors still aligned with the init's). Each output is written beside OUT and renamed into place.
    """
    from quailora_convert.errors import BadInputError
    from quailora_convert.export import export_lora_for_source, export_merged

    if merged is None and lora_for_source is None:
        raise BadInputError("export: give --merged OUT, --lora-for-source OUT, or both")
    if merged is not None and lora_for_source is not None and merged.resolve() == lora_for_source.resolve():
        raise BadInputError(f"export: --merged and --lora-for-source are both {merged}; give two folders")
    if dtype is not None and dtype not in MERGED_DTYPES:
        raise BadInputError(f"--dtype must be one of {', '.join(MERGED_DTYPES)}, got {dtype!r}")
    if merged is not None:
        import torch

        done = export_merged(adapter, bundle, merged, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
                             dtype=getattr(torch, dtype) if dtype else None)
        typer.echo(f"merged model written to {done}: AutoModelForCausalLM.from_pretrained({str(done)!r})")
    if lora_for_source is not None:
        done = export_lora_for_source(adapter, bundle, lora_for_source, overwrite=overwrite)
        typer.echo(f"LoRA for the source written to {done}: AutoPeftModelForCausalLM.from_pretrained({str(done)!r})")
