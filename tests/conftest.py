import os
from pathlib import Path

import pytest
import torch

from paths import CALIB_DIR

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One BLAS/OpenMP thread, in this process and the CLI subprocesses: the float64 eigh/SVD calls are
# small, and on a 2-core machine shared with other work, spinning OpenMP threads made them 10-100x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def alpaca_calib() -> Path:
    path = CALIB_DIR / "self_instruct_alpaca.jsonl"
    if not path.exists():
        pytest.skip(f"needs the workplace's ../shared calibration data ({path} missing)")
    return path
