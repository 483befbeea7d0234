"""Orchestration: settings, architectures, activation capture, the per-layer unit of work, the loop, the report.

    from quailora_convert.convert import ConvertSettings, convert
    convert(ConvertSettings(model="HuggingFaceTB/SmolLM2-135M-Instruct", out=Path("out"), calib="alpaca"))
"""
from .pipeline import convert
from .settings import ConvertSettings

__all__ = ["ConvertSettings", "convert"]
