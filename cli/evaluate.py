"""`quailora-convert eval DIR`: held-out perplexity of a bundle, plain QLoRA, the source and int8."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from quailora_cli.app import app, defaults_of
from quailora_cli.progress import Reporter, choose_mode
from quailora_convert.bundle.layout import EVAL
from quailora_convert.eval_settings import EvalSettings

if TYPE_CHECKING:
    from quailora_convert.sources.resolve import ModelSource

EVAL_DEFAULT = defaults_of(EvalSettings)


def _quiet_libraries(ctx: typer.Context, verbose: bool) -> bool:
    """--verbose's callback: the whole command runs inside quiet_libraries(verbose), left when the command ends."""
    from quailora_convert.quiet_libraries import quiet_libraries

    if not ctx.resilient_parsing:
        ctx.with_resource(quiet_libraries(verbose))
    return verbose


# Any command's `verbose: VerboseOption = False` parameter: library warnings filtered unless --verbose.
VerboseOption = Annotated[bool, typer.Option("--verbose", callback=_quiet_libraries, help=(
    "Also show the libraries' warnings that nothing on the command line can change (filtered by default)."))]


@app.command("eval")
def eval_command(
    bundle: Annotated[Path, typer.Argument(help="A bundle folder written by convert.")],
    data: Annotated[Optional[str], typer.Option("--data", help=(
        "Held-out text: a .json/.jsonl/.txt file, a calibration preset, or 'self' (text the source model samples "
        "from prompts disjoint from --calib self's). Default: self when the source is available."))] = EVAL_DEFAULT["data"],
    num_samples: Annotated[int, typer.Option("--num-samples", help="Held-out sequences.")] = EVAL_DEFAULT["num_samples"],
    seq_len: Annotated[int, typer.Option("--seq-len", help="Max tokens per held-out sequence.")] = EVAL_DEFAULT["seq_len"],
    source: Annotated[Optional[str], typer.Option("--source", help=(
        "The source model (folder, .gguf or Hub id), used as given; default: the source the bundle's report "
        "records, if its files still match the recorded fingerprint (else the source rows are left out)."))] = EVAL_DEFAULT["source"],
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per forward.")] = EVAL_DEFAULT["batch_size"],
    seed: Annotated[int, typer.Option("--seed", help="Seed of held-out sampling.")] = EVAL_DEFAULT["seed"],
    json_path: Annotated[Optional[Path], typer.Option(
        "--json", help="Also write the result here.")] = EVAL_DEFAULT["json_path"],
    replace_eval: Annotated[bool, typer.Option("--replace-eval", help=(
        "Replace DIR's quailora_eval.json even when it has rows this eval lacks (e.g. the source rows); without "
        "it such an eval is refused, or written to --json only."))] = EVAL_DEFAULT["replace_eval"],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the path of the result JSON.")] = False,
    verbose: VerboseOption = False,
) -> None:
    """Perplexity of DIR with and without its adapter, and of the source in full precision and int8.

    Writes quailora_eval.json into DIR (and --json) and re-renders the bundle's model card.
    """
    settings = EvalSettings(bundle=bundle, data=data, num_samples=num_samples, seq_len=seq_len, source=source,
                            batch_size=batch_size, seed=seed, json_path=json_path, replace_eval=replace_eval)
    with Reporter(choose_mode(quiet)) as reporter:
        run_eval(settings, reporter)
    if quiet:
        typer.echo(str(json_path or bundle / EVAL))


def run_eval(settings: EvalSettings, reporter: Reporter, opened: ModelSource | None = None) -> dict:
    """evaluate() (with the source model already opened, if given), then the perplexity table into README.md."""
    from quailora_convert.evaluate import evaluate
    from quailora_convert.model_card import render_model_card

    result = evaluate(settings, on_event=reporter, opened=opened)
    render_model_card(Path(settings.bundle))
    return result
