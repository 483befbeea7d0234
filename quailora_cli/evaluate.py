"""`quailora-convert eval DIR`: held-out perplexity of a bundle, plain QLoRA, the source and int8."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from quailora_cli.app import app
from quailora_cli.progress import Reporter, choose_mode

log = logging.getLogger(__name__)
DataOption = Annotated[Optional[str], typer.Option(
    "--data", help="Held-out text: a .json/.jsonl/.txt file, a calibration preset, or 'self' (text the source "
                   "model samples from prompts disjoint from --calib self's). Default: self when the source is "
                   "available.")]
NumSamplesOption = Annotated[int, typer.Option("--num-samples", help="Held-out sequences.")]
SeqLenOption = Annotated[int, typer.Option("--seq-len", help="Max tokens per held-out sequence.")]


@app.command("eval")
def eval_command(
    bundle: Annotated[Path, typer.Argument(help="A bundle folder written by convert.")],
    data: DataOption = None,
    num_samples: NumSamplesOption = 32,
    seq_len: SeqLenOption = 256,
    source: Annotated[Optional[str], typer.Option(
        "--source", help="The source model (folder, .gguf or Hub id); default: the MODEL in the bundle's report.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per forward.")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Seed of held-out sampling.")] = 1234,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the result here.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the path of the result JSON.")] = False,
) -> None:
    """Perplexity of DIR with and without its adapter, and of the source in full precision and int8.

    Writes quailora_eval.json into DIR (and --json) and re-renders the bundle's model card.
    """
    from quailora_convert.evaluate import EVAL_NAME, EvalSettings

    settings = EvalSettings(bundle=bundle, data=data, num_samples=num_samples, seq_len=seq_len, source=source,
                            batch_size=batch_size, seed=seed, json_path=json_path)
    with Reporter(choose_mode(quiet)) as reporter:
        run_eval(settings, reporter)
    if quiet:
        typer.echo(str(json_path or bundle / EVAL_NAME))


def run_eval(settings, reporter) -> dict:
    from quailora_convert.evaluate import evaluate

    result = evaluate(settings, on_event=reporter)
    rerender_card(Path(settings.bundle))
    return result


def rerender_card(bundle: Path) -> None:
    """Put the perplexity table into the bundle's README.md (the model-card module may not exist yet)."""
    try:
        from quailora_convert.model_card import render_model_card
    except ImportError:  # model cards land separately; without them eval only writes quailora_eval.json
        return
    render_model_card(bundle)
