"""Orchestration: settings, architectures, activation capture, the per-layer unit of work, the loop, the report.

    from quailora_convert.convert import ConvertSettings, convert
    settings = ConvertSettings(model="HuggingFaceTB/SmolLM2-135M-Instruct", out=Path("out"), calib="alpaca")
    print(dry_run(settings).as_json())  # sizes, memory, seconds; writes nothing
    convert(settings)  # resumable: ConvertSettings(..., resume=True) continues an interrupted run

The names load on first use (PEP 562), so reading the settings does not import torch.
"""
from __future__ import annotations

__all__ = ["ConvertSettings", "convert", "dry_run"]


def __getattr__(name: str):
    if name == "ConvertSettings":
        from .settings import ConvertSettings

        return ConvertSettings
    if name in ("convert", "dry_run"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
