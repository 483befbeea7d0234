"""MODEL as a Hub id, resolved by huggingface_hub offline against a pre-populated cache."""
import shutil

import pytest
from huggingface_hub import constants

from quailora_convert.errors import BadInputError
from quailora_convert.hub import resolve_model
from quailora_convert.pipeline import ConvertSettings, convert
from tiny_models import save_tiny, tiny_llama_config, write_text_calibration

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An HF hub cache holding org/tiny-llama at COMMIT (main), plus an unrelated stray file."""
    source = save_tiny(tiny_llama_config(), tmp_path / "source")
    repo = tmp_path / "cache" / "models--org--tiny-llama"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path


def test_hub_id_resolves_to_the_pinned_snapshot(hub_cache):
    source = resolve_model("org/tiny-llama")
    assert source.repo_id == "org/tiny-llama" and source.commit == COMMIT
    assert (source.folder / "config.json").exists() and source.folder.name == COMMIT


def test_convert_from_a_hub_id_records_repo_and_commit(hub_cache):
    import json

    calib = write_text_calibration(hub_cache / "calib.jsonl")
    out = convert(ConvertSettings(model="org/tiny-llama", out=hub_cache / "bundle", calib=str(calib), rank=4,
                                  num_samples=4, seq_len=16))
    report = json.loads((out / "quailora_report.json").read_text())
    assert report["source"]["repo_id"] == "org/tiny-llama" and report["source"]["commit"] == COMMIT


def test_uncached_repo_offline_is_one_actionable_line(hub_cache):
    with pytest.raises(BadInputError, match="HF_HUB_OFFLINE") as error:
        resolve_model("org/not-cached")
    assert "\n" not in str(error.value)


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(BadInputError, match="no such folder"):
        resolve_model(str(tmp_path / "nope"))
