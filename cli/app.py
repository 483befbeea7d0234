"""The Typer application that every command module registers on, and where its defaults come from."""
from dataclasses import MISSING, fields

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn a Hugging Face causal LM into a QLoRA bundle with a QuAILoRA-initialised adapter.")


@app.callback()
def root() -> None:
    """quailora-convert MODEL --calib DATA --out DIR [options]  (the convert command)."""


def defaults_of(settings_class) -> dict[str, object]:
    """Every field of a settings dataclass that has a default, with it: the options' defaults, owned there."""
    return {f.name: f.default for f in fields(settings_class) if f.default is not MISSING}
