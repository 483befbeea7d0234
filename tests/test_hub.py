"""MODEL as a Hub id, resolved by huggingface_hub offline against a pre-populated cache."""
import shutil

import pytest
from huggingface_hub import constants

from quailora_convert.errors import BadInputError
from quailora_convert.sources.resolve import open_model
from quailora_convert.convert import ConvertSettings, convert
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
    with open_model("org/tiny-llama") as source:
        assert source.repo_id == "org/tiny-llama" and source.commit == COMMIT
        assert (source.folder / "config.json").exists() and source.folder.name == COMMIT
    assert source.folder.exists()  # the HF cache's snapshot: not a temporary folder of ours


def test_convert_from_a_hub_id_records_repo_and_commit(hub_cache):
    import json

    calib = write_text_calibration(hub_cache / "calib.jsonl")
    out = convert(ConvertSettings(model="org/tiny-llama", out=hub_cache / "bundle", calib=str(calib), rank=4,
                                  num_samples=4, seq_len=16))
    report = json.loads((out / "quailora_report.json").read_text())
    assert report["source"]["repo_id"] == "org/tiny-llama" and report["source"]["commit"] == COMMIT


def test_uncached_repo_offline_is_one_actionable_line(hub_cache):
    with pytest.raises(BadInputError, match="HF_HUB_OFFLINE") as error, open_model("org/not-cached"):
        pass
    assert "\n" not in str(error.value)


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(BadInputError, match="no such folder"), open_model(str(tmp_path / "nope")):
        pass


@pytest.fixture
def hub_answering(monkeypatch, tmp_path):
    """Route huggingface_hub's own HTTP client to a handler that answers every request with one error."""
    import httpx2
    from huggingface_hub.utils import _http

    def install(status: int, error_code: str | None, message: str):
        def handler(request):
            headers = {"X-Error-Message": message, **({"X-Error-Code": error_code} if error_code else {})}
            return httpx2.Response(status, headers=headers, json={"error": message})

        _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(handler)))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))

    yield install
    _http.set_client_factory(_http.default_client_factory)


@pytest.mark.parametrize("status,code,message", [
    (401, "GatedRepo", "accept its licence on huggingface.co and set HF_TOKEN"),
    (404, "RepoNotFound", "not found on the Hub"),
    (404, "RevisionNotFound", "revision 'v9' not found"),
])
def test_hub_download_errors_are_one_actionable_line(hub_answering, status, code, message):
    hub_answering(status, code, "refused by the fake hub")
    with pytest.raises(BadInputError, match=message) as error, open_model("org/some-model", revision="v9"):
        pass
    assert "\n" not in str(error.value) and error.value.__cause__ is not None


def test_dry_run_of_a_hub_id_reads_no_weight_shard(hub_cache):
    from quailora_convert.convert.pipeline import dry_run

    snapshot = hub_cache / "cache" / "models--org--tiny-llama" / "snapshots" / COMMIT
    for shard in snapshot.glob("*.safetensors"):
        shard.unlink()  # only config, index and tokenizer are cached: a conversion could not run
    calib = write_text_calibration(hub_cache / "calib.jsonl")
    plan = dry_run(ConvertSettings(model="org/tiny-llama", out=hub_cache / "bundle", calib=str(calib), rank=4,
                                   num_samples=8, seq_len=32, batch_size=4))
    assert plan.layers == 2 and plan.targeted_modules == 14 and plan.bundle_bytes > 0 and plan.seconds > 0
    assert not (hub_cache / "bundle").exists()
