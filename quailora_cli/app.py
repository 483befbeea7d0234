"""The Typer application that every command module registers on."""
import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn a Hugging Face causal LM into a QLoRA bundle with a QuAILoRA-initialised adapter.")


@app.callback()
def root() -> None:
    """quailora-convert MODEL --calib DATA --out DIR [options]  (the convert command)."""
