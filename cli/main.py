"""Entry point: `quailora-convert MODEL ...` converts; named subcommands come first when present."""
from __future__ import annotations

import logging
import os
import sys

import typer

from quailora_cli import convert as _convert_commands  # noqa: F401  registers `convert`
from quailora_cli import demo as _demo_commands  # noqa: F401  registers `demo`
from quailora_cli import evaluate as _evaluate_commands  # noqa: F401  registers `eval`
from quailora_cli import export as _export_commands  # noqa: F401  registers `export`
from quailora_cli import inspect_bundle as _inspect_commands  # noqa: F401  registers `inspect`
from quailora_cli import publish as _publish_commands  # noqa: F401  registers `push-to-hub`
from quailora_cli.app import app
from quailora_convert.errors import Interrupted, PeerFailed, QuailoraError, is_quiet_rank
from quailora_convert.stopping import StopRequested, stop_behind

ERROR_MESSAGES: list[tuple[type[BaseException], str]] = [
    (QuailoraError, "{error}"),
    (FloatingPointError, "numerical problem: {error}"),
    (FileNotFoundError, "file not found: {error}"),
    (MemoryError, "out of memory: lower --batch-size or --seq-len, or use a GPU"),
]


def main(argv: list[str] | None = None) -> None:
    """Console script: routes `quailora-convert MODEL ...` to `convert` and maps errors to one line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {command.name or command.callback.__name__.replace("_", "-") for command in app.registered_commands}
    if argv and argv[0] not in commands and not argv[0].startswith("-"):
        argv.insert(0, "convert")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        try:
            app(args=argv, prog_name="quailora-convert")  # usage errors: click's message, exit 2
        except BaseException as error:  # torchrun: a rank other than 0 whose failure rank 0 reports says nothing
            if is_quiet_rank(error):
                raise SystemExit(_exit_code(error)) from None
            raise
    except PeerFailed as failed:  # rank 0 of a torchrun: another rank failed
        notes = "".join(f"; {note}" for note in getattr(failed, "__notes__", []))  # where the finished layers are
        typer.echo(f"error: {failed}{notes}", err=True)
        raise SystemExit(failed.exit_code) from None
    except Interrupted as stop:  # SIGTERM / SIGINT: the run stopped at a resume point
        typer.echo(str(stop), err=True)
        raise SystemExit(stop.exit_code) from None
    except KeyboardInterrupt:  # Ctrl-C outside a conversion
        typer.echo("interrupted", err=True)
        raise SystemExit(130) from None
    except StopRequested as stop:  # a stop signal outside the layer loop (opening a GGUF file, --eval)
        typer.echo("interrupted", err=True)
        raise SystemExit(stop.exit_code) from None
    except Exception as error:  # noqa: BLE001 - the one place that turns errors into exit codes
        stop = stop_behind(error)  # a stop signal that code it interrupted turned into its own error
        if isinstance(stop, StopRequested):
            typer.echo("interrupted", err=True)
            raise SystemExit(stop.exit_code) from None
        _fail(error)


def _exit_code(error: BaseException) -> int:
    stop = stop_behind(error)
    if isinstance(stop, (StopRequested, Interrupted, PeerFailed)):
        return stop.exit_code
    return 2 if isinstance(error, QuailoraError) else 1


def _fail(error: BaseException) -> None:
    if os.environ.get("QUAILORA_DEBUG"):
        raise error
    notes = "".join(f"; {note}" for note in getattr(error, "__notes__", []))  # e.g. where the finished layers are kept
    for kind, template in ERROR_MESSAGES:
        if isinstance(error, kind):
            typer.echo(f"error: {template.format(error=error)}{notes}", err=True)
            raise SystemExit(2 if isinstance(error, QuailoraError) else 1)
    typer.echo(f"error: {type(error).__name__}: {error}{notes} (set QUAILORA_DEBUG=1 for the traceback)", err=True)
    raise SystemExit(1)
