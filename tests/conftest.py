import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CALIB_DIR = SHARED / "data" / "calib"


@pytest.fixture(scope="session")
def alpaca_calib() -> Path:
    path = CALIB_DIR / "self_instruct_alpaca.jsonl"
    if not path.exists():
        pytest.skip(f"needs the workplace's ../shared calibration data ({path} missing)")
    return path
