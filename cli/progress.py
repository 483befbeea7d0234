"""Listening to pipeline events: rich bars on a terminal, plain lines otherwise, nothing with --quiet.

The library only emits typed events (quailora_convert.events); this module owns every bar. Every
event type has a handler here; an event of an unknown type raises (a test checks the coverage). Progress
bars of the libraries we call (transformers' weight loading, GGUF dequantization, huggingface_hub
downloads off a terminal) are silenced so that logs and pipes stay line-based.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from rich import box
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from quailora_convert.events import (Calibrated, ConversionDone, EvalBatchDone, EvalDone, EvalModelStarted, EvalRowDone,
                                     Event, LayerConverted, SourceResolved, Status, TextGenerated)

QUIET, RICH, PLAIN = "quiet", "rich", "plain"
WARNING = "warning: "  # a Status message that starts so is a warning: stderr, also with --quiet


def choose_mode(quiet: bool, stream=None) -> str:
    if quiet:
        return QUIET
    stream = stream or sys.stdout
    return RICH if getattr(stream, "isatty", lambda: False)() and os.environ.get("TERM") != "dumb" else PLAIN


def silence_libraries(mode: str) -> None:
    """No tqdm from transformers ever (we draw our own); none from huggingface_hub off a terminal."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if mode != RICH:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    # bitsandbytes logs one warning per int8 matmul when inputs are cast; transformers warns about generation flags.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if mode == QUIET:
        transformers.utils.logging.set_verbosity_error()


class Reporter:
    """Callable on events; a context manager so that a failure never leaves a live display behind."""

    def __init__(self, mode: str, console: Console | None = None):
        self.mode = mode
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.progress: Progress | None = None
        self.tasks: dict[str, int] = {}
        self.started = time.perf_counter()
        self.layer_started: float | None = None

    def __enter__(self) -> Reporter:
        silence_libraries(self.mode)
        if self.mode == RICH:
            self.progress = Progress(
                SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn(),
                MofNCompleteColumn(), TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("eta"),
                TimeRemainingColumn(), console=self.console, transient=False)
            self.progress.start()
        return self

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    # -- events -------------------------------------------------------------------------------
    def __call__(self, event: Event) -> None:
        handler = HANDLERS.get(type(event))
        if handler is None:
            raise TypeError(f"the progress reporter has no handler for {type(event).__name__}")
        if self.mode != QUIET or is_warning(event):
            handler(self, event)

    def line(self, text: str) -> None:
        if self.mode == QUIET:
            return
        if self.progress is not None:
            self.progress.console.print(text, markup=False)
        else:
            print(text, flush=True)

    def _bar(self, key: str, description: str, total: int, done: int) -> None:
        if self.progress is None:
            return
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(description, total=total)
        self.progress.update(self.tasks[key], completed=done, total=total, description=description)

    def warn(self, text: str) -> None:
        """A warning on stderr (above the bars on a terminal), whatever the mode."""
        print(text, file=sys.stderr, flush=True)

    def _on_status(self, event: Status) -> None:
        if is_warning(event):
            self.warn(event.message)
        else:
            self.line(f"... {event.message}")

    def _on_resolved(self, event: SourceResolved) -> None:
        if event.gguf:
            self.line(f"model: {event.gguf} (dequantized into {event.folder})")
            return
        self.line(f"model: {event.repo_id or event.folder}" + (f" @ {event.commit}" if event.commit else ""))

    def _on_generated(self, event: TextGenerated) -> None:
        if self.progress is not None:
            self._bar("generate", "generating text", event.total, event.done)
        else:
            self.line(f"generated {event.done}/{event.total} samples")

    def _on_calibrated(self, event: Calibrated) -> None:
        self.line(f"calibration: {event.samples} samples captured in {event.seconds:.1f}s")
        self.layer_started = time.perf_counter()

    def _on_layer(self, event: LayerConverted) -> None:
        done, count = event.index + 1, event.count
        if self.progress is not None:
            self._bar("layers", "quantize + solve + write layers", count, done)
            return
        elapsed = time.perf_counter() - (self.layer_started or self.started)
        eta = elapsed / done * (count - done)
        self.line(f"layer {done}/{count} done in {event.seconds:.1f}s (elapsed {_duration(elapsed)}, eta {_duration(eta)})")

    def _on_done(self, event: ConversionDone) -> None:
        self.stop()
        self.console.print(summary_table(event.report, Path(event.out), rich=self.mode == RICH))

    def _on_eval_model(self, event: EvalModelStarted) -> None:
        self.line(f"evaluating {event.model} ({event.index + 1}/{event.count})")

    def _on_eval_batch(self, event: EvalBatchDone) -> None:
        self._bar("eval:" + event.model, f"perplexity: {event.model}", event.total, event.done)

    def _on_eval_row(self, event: EvalRowDone) -> None:
        if self.progress is None:
            self.line(f"  perplexity {event.perplexity:.4f}")

    def _on_eval_done(self, event: EvalDone) -> None:
        self.stop()
        self.console.print(eval_table(event.result, rich=self.mode == RICH))
        if self.mode != RICH:
            self.line(f"data: {event.result['data']}")


def is_warning(event: Event) -> bool:
    return isinstance(event, Status) and event.message.startswith(WARNING)


HANDLERS = {
    Status: Reporter._on_status, SourceResolved: Reporter._on_resolved, TextGenerated: Reporter._on_generated,
    Calibrated: Reporter._on_calibrated, LayerConverted: Reporter._on_layer, ConversionDone: Reporter._on_done,
    EvalModelStarted: Reporter._on_eval_model, EvalBatchDone: Reporter._on_eval_batch,
    EvalRowDone: Reporter._on_eval_row, EvalDone: Reporter._on_eval_done,
}


# -- tables -----------------------------------------------------------------------------------
def summary_rows(report: dict, out: Path) -> list[tuple[str, str]]:
    modules = report["modules"]
    reductions = [1 - m["error_after"] / m["error_before"] for m in modules if m["error_before"] > 0]
    mean = sum(reductions) / len(reductions) if reductions else float("nan")
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    return [
        ("bundle", str(out)),
        ("modules with an adapter", str(report["summary"]["modules"])),
        ("mean calibrated-error reduction", f"{mean:.1%}"),
        ("total calibrated error vs plain", f"{report['summary']['relative_error_after']:.1%}"
         if report["summary"]["relative_error_after"] is not None else "n/a"),
        ("bundle size on disk", _size(size)),
        ("time", _duration(report["timings"]["total_seconds"])),
        ("peak memory (RSS)", _size(report["peak_rss_bytes"])),
    ]


def summary_table(report: dict, out: Path, rich: bool = True) -> Table:
    table = Table(title="conversion summary" if rich else None, show_header=False,
                  box=box.ROUNDED if rich else box.ASCII2)
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in summary_rows(report, out):
        table.add_row(key, value)
    return table


def eval_table(result: dict, rich: bool = True) -> Table:
    source = next((r["perplexity"] for r in result["rows"] if r["model"].startswith("source (")), None)
    table = Table(title="held-out perplexity" if rich else None, box=box.ROUNDED if rich else box.ASCII2,
                  caption=f"data: {result['data']}" if rich else None)
    table.add_column("model")
    table.add_column("perplexity", justify="right")
    table.add_column("vs source", justify="right")
    for row in result["rows"]:
        delta = f"{row['perplexity'] / source - 1:+.2%}" if source else ""
        table.add_row(row["model"], f"{row['perplexity']:.4f}", delta)
    if result.get("gap_closed") is not None:
        table.add_section()
        table.add_row("gap closed (plain NF4 -> int8)", f"{result['gap_closed']:.1%}", "")
    return table


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
