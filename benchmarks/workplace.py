"""What the benchmarks share: where the real SmolLM2 folder and the workplace's calibration data (../shared) are,
and how a benchmark finds the console script it times."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
# the real SmolLM2-135M-Instruct folder that ../shared/scripts/smollm2.py writes
DEFAULT_SOURCE = Path.home() / ".cache" / "quailora-test-models" / "smollm2-135m-instruct"
DEFAULT_CALIB = SHARED / "data" / "calib" / "self_instruct_alpaca.jsonl"


def require_calibration(path: Path) -> None:
    if not path.is_file():
        raise SystemExit(f"{path}: calibration file not found (it lives in the workplace's ../shared)")


def console_script() -> str:
    """quailora-convert beside this interpreter (a venv's bin, whether or not it is on PATH), else from PATH."""
    beside = Path(sys.executable).with_name("quailora-convert")
    return str(beside) if beside.is_file() else shutil.which("quailora-convert") or "quailora-convert"
