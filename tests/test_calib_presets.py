"""Hub calibration sources, offline: a hand-built HF hub cache holding each preset's real file layout.

The real loading code runs (huggingface_hub cache resolution, `datasets` readers, formatters); only
the cache location and offline mode are pointed at a temp dir.
"""
import gzip
import json
import random

import pytest

from cli_process import run_cli
from quailora_convert.calibration import hub_datasets
from quailora_convert.calibration.batches import sample_token_sequences
from quailora_convert.calibration.texts import read_texts
from quailora_convert.errors import BadInputError
from tiny_models import byte_tokenizer, save_tiny, tiny_llama_config

datasets = pytest.importorskip("datasets")

HH_CHOSEN = "\n\nHuman: What is the capital of France?\n\nAssistant: Paris is the capital of France."
SLIM_TURNS = [
    {"from": "system", "value": "You are a helpful assistant.", "weight": None},
    {"from": "human", "value": "Translate 'bonjour' to English.", "weight": 0.0},
    {"from": "gpt", "value": "Hello.", "weight": 1.0},
]


def write_repo(cache, repo_id, files, revision="main", sha=None):
    """<cache>/datasets--ORG--NAME/{refs/<revision>, snapshots/<sha>/<files>}: huggingface_hub's layout."""
    sha = sha or "%040x" % random.Random(repo_id + revision).getrandbits(160)
    repo = cache / ("datasets--" + repo_id.replace("/", "--"))
    (repo / "refs" / revision).parent.mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(sha)
    for name, write in files.items():
        path = repo / "snapshots" / sha / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    return sha


def parquet(records):
    return lambda path: datasets.Dataset.from_list(records).to_parquet(str(path))


def jsonl(records, compress=False):
    def write(path):
        text = "".join(json.dumps(r) + "\n" for r in records)
        path.write_bytes(gzip.compress(text.encode()) if compress else text.encode())
    return write


def populate(cache):
    write_repo(cache, "tatsu-lab/alpaca", {"data/train-00000-of-00001-a09b74b3ef9c3b56.parquet": parquet([
        {"instruction": f"Give word {i}.", "input": "" if i % 2 else "context", "output": f"word {i}",
         "text": "ignored"} for i in range(6)])})
    write_repo(cache, "laion/OIG", {"unified_chip2.jsonl": jsonl([
        {"text": f"<human>: Question {i}?\n<bot>: Answer {i}.", "metadata": {"source": "unified_chip2"}}
        for i in range(5)])})
    write_repo(cache, "yizhongw/self_instruct", revision="refs/convert/parquet", files={
        "self_instruct/train/0000.parquet": parquet([
            {"prompt": f"List {i} colors.\n\nOutput:", "completion": " red, blue<|endoftext|>"} for i in range(4)])})
    hh = [{"chosen": HH_CHOSEN, "rejected": "\n\nHuman: What is the capital of France?\n\nAssistant: No."}]
    write_repo(cache, "Anthropic/hh-rlhf", {
        "helpful-base/train.jsonl.gz": jsonl(hh * 3, compress=True),
        "harmless-base/train.jsonl.gz": jsonl(hh * 2, compress=True),
        "helpful-base/test.jsonl.gz": jsonl([{"chosen": "\n\nHuman: test?\n\nAssistant: yes.", "rejected": "no"}],
                                            compress=True),
        "red-team-attempts/red_team_attempts.jsonl.gz": jsonl([{"transcript": "not a preference pair"}], compress=True),
    })
    write_repo(cache, "Open-Orca/SlimOrca", {"oo-labeled_correct.gpt4.sharegpt.jsonl": jsonl(
        [{"conversations": SLIM_TURNS}] * 3)})
    write_repo(cache, "acme/notes", {
        "README.md": lambda p: p.write_text("---\nlicense: mit\n---\n# notes\n"),
        "data/train-00000-of-00001.parquet": parquet(
            [{"id": i, "body": f"note number {i}", "messages": [{"role": "user", "content": f"hi {i}"},
                                                                {"role": "assistant", "content": "hello"}]}
             for i in range(50)]),
        "data/test-00000-of-00001.parquet": parquet([{"id": 99, "body": "held out", "messages": []}]),
    })
    write_repo(cache, "acme/instructions", {
        "README.md": lambda p: p.write_text(
            "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: raw/part-*.jsonl\n---\n"),
        "raw/part-0.jsonl": jsonl([{"instruction": "Add 1 and 2.", "input": "", "output": "3"}]),
        "raw/part-1.jsonl": jsonl([{"instruction": "Add 2 and 2.", "input": "", "output": "4"}]),
    })


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    """Offline mode pointed at a populated hub cache; datasets' Arrow cache in the same temp dir."""
    import huggingface_hub.constants as hub_constants

    root = tmp_path_factory.mktemp("hf")
    hub = root / "hub"
    populate(hub)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in [("HF_HOME", root), ("HF_HUB_CACHE", hub), ("HF_DATASETS_CACHE", root / "datasets"),
                            ("HF_HUB_OFFLINE", "1")]:
            mp.setenv(name, str(value))
        mp.setattr(hub_constants, "HF_HUB_CACHE", str(hub))  # read from the environment at import time
        mp.setattr(hub_constants, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", root / "datasets")
        mp.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", root / "datasets" / "downloads")
        mp.setattr(datasets.config, "EXTRACTED_DATASETS_PATH", root / "datasets" / "downloads" / "extracted")
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        yield root


ALPACA_HEAD = "Below is an instruction that describes a task"


@pytest.mark.parametrize("preset,count,expected", [
    ("alpaca", 6, f"{ALPACA_HEAD}. Write a response that appropriately completes the request.\n\n"
                  "### Instruction:\nGive word 1.\n\n### Response:\nword 1"),
    ("chip2", 5, "<human>: Question 0?\n<bot>: Answer 0."),
    ("self-instruct", 4, "List 0 colors.\n\nOutput: red, blue"),
    ("hh-rlhf", 5, "Human: What is the capital of France?\n\nAssistant: Paris is the capital of France."),
    ("slimorca", 3, "You are a helpful assistant.\n\nHuman: Translate 'bonjour' to English.\n\nAssistant: Hello."),
])
def test_every_preset_loads_and_formats_from_the_cache(hf_cache, preset, count, expected):
    texts = read_texts(preset)
    assert len(texts) == count  # hh-rlhf: both */train.jsonl.gz, not the test file nor red-team attempts
    assert expected in texts


def test_preset_split_and_alpaca_input(hf_cache):
    assert read_texts("hh-rlhf", split="test") == ["Human: test?\n\nAssistant: yes."]
    with_input = [t for t in read_texts("alpaca") if "### Input:\ncontext" in t]
    assert len(with_input) == 3 and with_input[0].startswith(ALPACA_HEAD + ", paired with an input")
    with pytest.raises(BadInputError, match="no split 'validation'"):
        read_texts("slimorca", split="validation")
    with pytest.raises(BadInputError, match="--calib-field does not apply"):
        read_texts("chip2", field="text")


def test_hub_dataset_with_a_field_and_split(hf_cache):
    texts = read_texts("acme/notes", field="body")
    assert sorted(texts, key=lambda t: int(t.split()[-1])) == [f"note number {i}" for i in range(50)]
    assert read_texts("acme/notes", split="test", field="body") == ["held out"]
    assert read_texts("acme/notes", field="messages", max_records=1, seed=0)[0].startswith("Human: hi ")
    assert "Assistant: hello" in read_texts("acme/notes", field="messages", max_records=1, seed=0)[0]


def test_hub_dataset_columns_are_detected_or_named(hf_cache):
    texts = read_texts("acme/instructions")  # README `configs` data files; Alpaca columns detected
    assert len(texts) == 2 and all(t.startswith(ALPACA_HEAD) for t in texts) and any(t.endswith("\n4") for t in texts)
    with pytest.raises(BadInputError) as error:
        read_texts("acme/notes")
    message = str(error.value)
    assert "--calib-field" in message and "id, body, messages" in message and "\n" not in message
    with pytest.raises(BadInputError, match="no column 'nope'"):
        read_texts("acme/notes", field="nope")
    with pytest.raises(BadInputError, match="no split 'validation'; --calib-split one of: train, test"):
        read_texts("acme/notes", split="validation", field="body")


def test_hub_selection_is_seeded_and_bounded(hf_cache):
    first = read_texts("acme/notes", field="body", max_records=10, seed=1)
    assert len(first) == 10 and len(set(first)) == 10
    assert first == read_texts("acme/notes", field="body", max_records=10, seed=1)
    assert first != read_texts("acme/notes", field="body", max_records=10, seed=2)
    tok = byte_tokenizer()
    tiny = 2  # these notes (3 tokens each) are below the calibration minimum, which is not what this checks
    assert sample_token_sequences(first, tok, 5, 8, seed=1, min_tokens=tiny) == sample_token_sequences(
        read_texts("acme/notes", field="body", max_records=10, seed=1), tok, 5, 8, seed=1, min_tokens=tiny)


def test_missing_from_cache_offline_is_one_line_naming_dataset_and_offline(hf_cache, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    for source in ["slimorca", "acme/never-downloaded"]:
        with pytest.raises(BadInputError) as error:
            read_texts(source)
        message = str(error.value)
        assert "\n" not in message and "HF_HUB_OFFLINE" in message, message
        assert ("Open-Orca/SlimOrca" if source == "slimorca" else source) in message
        assert error.value.__cause__ is not None


def test_local_files_and_paths_are_not_taken_for_hub_ids(tmp_path):
    assert hub_datasets.looks_like_hub_id("Open-Orca/SlimOrca")
    assert not hub_datasets.looks_like_hub_id("data/calib.jsonl")
    assert not hub_datasets.looks_like_hub_id("/abs/path") and not hub_datasets.looks_like_hub_id("./x/y")
    (tmp_path / "a.jsonl").write_text('{"text": "one two"}\n')
    with pytest.raises(BadInputError, match="apply to Hub datasets"):
        read_texts(str(tmp_path / "a.jsonl"), field="text")
    with pytest.raises(BadInputError, match="not a file"):
        read_texts("missing/calib.jsonl")


def test_cli_converts_a_tiny_model_with_a_preset_from_the_cache(hf_cache, tmp_path):
    source = save_tiny(tiny_llama_config(), tmp_path / "source")
    env = {"HF_HOME": str(hf_cache), "HF_HUB_CACHE": str(hf_cache / "hub"), "HF_DATASETS_CACHE": str(hf_cache / "datasets")}
    args = [str(source), "--out", str(tmp_path / "b"), "--rank", "4", "--num-samples", "4", "--seq-len", "16"]
    result = run_cli(*args, "--calib", "hh-rlhf", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "b" / "quailora_report.json").read_text())
    assert report["settings"]["calib"] == "hh-rlhf" and report["calibration"]["samples"] == 4
    assert report["summary"]["relative_error_after"] < 1.0

    env["HF_HUB_CACHE"] = str(tmp_path / "empty-cache")
    failed = run_cli(*args[:2], tmp_path / "c", *args[3:], "--calib", "slimorca", env=env)
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert failed.returncode == 2 and len(errors) == 1, failed.stderr
    assert "Open-Orca/SlimOrca" in errors[0] and "HF_HUB_OFFLINE" in errors[0]
    assert not (tmp_path / "c").exists()
