"""Orchestration: settings, architectures, activation capture, the per-layer unit of work, the loop, the report.

    from quailora_convert.convert import ConvertSettings, convert
    convert(ConvertSettings(model="HuggingFaceTB/SmolLM2-135M-Instruct", out=Path("out"), calib="alpaca"))

Both names load on first use (PEP 562), so reading the settings does not import torch.
"""
from __future__ import annotations

__all__ = ["ConvertSettings", "convert"]


def __getattr__(name: str):
    if name == "ConvertSettings":
        from .settings import ConvertSettings

        return ConvertSettings
    if name == "convert":
        from .pipeline import convert

        return convert
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
