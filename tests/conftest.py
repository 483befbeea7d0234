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


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """Every huggingface_hub request goes to a FakeHub (tests/fake_hub.py) through its own client; online, HF_TOKEN set."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    from fake_hub import TOKEN, FakeHub

    fake = FakeHub(endpoint=constants.ENDPOINT)
    _http.set_client_factory(
        lambda: httpx2.Client(transport=httpx2.WSGITransport(app=fake), follow_redirects=True, timeout=None))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    yield fake
    _http.set_client_factory(_http.default_client_factory)
