"""Bad input a new user meets (issue 8): each is refused with ONE actionable error line naming the file or
tensor, and a non-zero exit, before any minutes of work.

- NaN/inf anywhere in the source (norms, embeddings, not only decoder linears);
- a truncated safetensors shard, a config.json that is not JSON, a binary calibration file;
- calibration (or held-out) text far too short for the settings;
- eval / inspect / push-to-hub on an incomplete or damaged bundle, checked before any model loads.
"""
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from bundles import make_bundle
from cli_process import run_cli
from quailora_convert.bundle.layout import INIT_ADAPTER_CONFIG, INIT_ADAPTER_WEIGHTS, read_config
from quailora_convert.bundle.read import verify_bundle
from quailora_convert.calibration.batches import sample_token_sequences
from quailora_convert.calibration.texts import read_texts
from quailora_convert.convert import ConvertSettings, convert
from quailora_convert.errors import BadInputError
from quailora_convert.sources.checkpoint import CheckpointReader
from tiny_models import byte_tokenizer

FAST = ["--rank", "4", "--num-samples", "8", "--seq-len", "32"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(source folder, calibration .jsonl, bundle folder) of a tiny random Llama."""
    root = tmp_path_factory.mktemp("bad_input")
    source, bundle = make_bundle(root)
    return source, root / "calib.jsonl", bundle


def first_error_line(result) -> str:
    """The first line of stderr, which must be the only error line; no traceback."""
    lines = result.stderr.splitlines()
    assert lines, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert [line for line in lines if line.startswith("error:")] == [lines[0]], result.stderr
    return lines[0]


def weight_map(folder):
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]


def poisoned_copy(source, folder, key, value=float("nan"), row=None):
    """A copy of source with one value (or one row) of tensor key set to value; returns (folder, its shard)."""
    shutil.copytree(source, folder)
    shard = folder / weight_map(folder)[key]
    tensors = load_file(shard)
    if row is None:
        tensors[key].view(-1)[0] = value
    else:
        tensors[key][row] = value
    save_file(tensors, shard, metadata={"format": "pt"})
    return folder, shard


# 1. NaN/inf outside the decoder linears -------------------------------------------------------------------------

POISONED = [
    ("model.norm.weight", float("nan"), None),
    ("model.embed_tokens.weight", float("inf"), 7),  # one embedding row
    ("model.layers.0.input_layernorm.weight", float("nan"), None),
    ("model.layers.1.mlp.down_proj.weight", float("-inf"), None),  # a decoder linear: checked before, same message now
]


@pytest.mark.parametrize("key,value,row", POISONED, ids=[p[0] for p in POISONED])
def test_non_finite_source_tensor_is_refused_naming_tensor_and_file(made, tmp_path, key, value, row):
    source, calib, _ = made
    broken, shard = poisoned_copy(source, tmp_path / "src", key, value, row)
    with pytest.raises(BadInputError) as error:
        convert(ConvertSettings(model=str(broken), out=tmp_path / "out", calib=str(calib), rank=4, num_samples=8,
                                seq_len=32))
    message = str(error.value)
    assert message.startswith(f"{key} in {shard} has non-finite values"), message
    assert "re-download" in message and "\n" not in message


def test_non_finite_source_through_the_cli(made, tmp_path):
    source, calib, _ = made
    key = "model.norm.weight"  # the final norm: converted with exit 0 into a bundle of all-NaN logits before
    broken, shard = poisoned_copy(source, tmp_path / "src", key)
    result = run_cli(broken, "--calib", calib, "--out", tmp_path / "out", *FAST)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert first_error_line(result).startswith(f"error: {key} in {shard} has non-finite values (1 NaN, 0 inf of ")


def test_reader_checks_every_floating_tensor_it_returns(made, tmp_path):
    from quailora_convert.sources.checkpoint import check_finite

    source, _, _ = made
    broken, shard = poisoned_copy(source, tmp_path / "src", "model.embed_tokens.weight", float("inf"), row=3)
    reader = CheckpointReader(broken)
    assert torch.isfinite(reader.get("model.norm.weight")).all()
    with pytest.raises(BadInputError, match=rf"^model\.embed_tokens\.weight in {re.escape(str(shard))} .*"
                                            r"\(0 NaN, 128 inf of 65536\)"):
        reader.get("model.embed_tokens.weight")
    check_finite(torch.arange(4), "ints", shard)  # integer tensors are not checked
    check_finite(torch.full((100,), 60000.0, dtype=torch.float16), "big", shard)  # finite, although its sum overflows
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2):
        bad = torch.zeros(5, dtype=dtype)
        bad[2] = float("nan")
        with pytest.raises(BadInputError, match=r"k in .* \(1 NaN, 0 inf of 5\)"):
            check_finite(bad, "k", shard)


# 2. Damaged files: shard, config.json, calibration ---------------------------------------------------------------

def test_truncated_shard_is_named(made, tmp_path):
    source, calib, _ = made
    broken = shutil.copytree(source, tmp_path / "src")
    shard = broken / weight_map(broken)["model.norm.weight"]
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    result = run_cli(broken, "--calib", calib, "--out", tmp_path / "out", *FAST)
    assert result.returncode == 2, (result.stdout, result.stderr)
    line = first_error_line(result)
    assert line.startswith(f"error: {shard} is not a readable safetensors file (") and "truncated" in line
    assert "re-download" in line


def test_missing_shard_and_broken_index_are_named(made, tmp_path):
    source, _, _ = made
    broken = shutil.copytree(source, tmp_path / "src")
    shard = broken / weight_map(broken)["model.norm.weight"]
    shard.unlink()
    with pytest.raises(BadInputError, match=rf"^{re.escape(str(shard))} is missing .*re-download"):
        CheckpointReader(broken).get("model.norm.weight")
    (broken / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(BadInputError, match=r"model\.safetensors\.index\.json is not a valid shard index"):
        CheckpointReader(broken)


def test_config_that_is_not_json_is_named_with_line_and_column(made, tmp_path):
    source, calib, _ = made
    broken = shutil.copytree(source, tmp_path / "src")
    (broken / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": 128,,\n}')
    result = run_cli(broken, "--calib", calib, "--out", tmp_path / "out", *FAST)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert first_error_line(result).startswith(
        f"error: config.json at {broken / 'config.json'} is not valid JSON (line 2 col 22): ")
    (broken / "config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(BadInputError, match="is not UTF-8 text"):
        read_config(broken)
    (broken / "config.json").write_text("[1, 2]")
    with pytest.raises(BadInputError, match="is not a JSON object"):
        read_config(broken)


@pytest.mark.parametrize("name,data,message", [
    ("calib.txt", bytes(range(256)) * 4, "is not UTF-8 text (undecodable byte 0x80 at offset 128)"),
    ("calib.jsonl", b"\xff\xfe\x00g\x00a\x00r\x00b\x00" * 20, "is not UTF-8 text (undecodable byte 0xff at offset 0)"),
    ("calib.json", b'[{"text": "a b"}]\x00\x00\x00', "is a binary file (it holds NUL bytes)"),
])
def test_binary_calibration_file_is_named(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(BadInputError) as error:
        read_texts(str(path))
    assert str(error.value).startswith(f"{path} {message}"), str(error.value)


def test_binary_calibration_file_through_the_cli(made, tmp_path):
    source, _, _ = made
    calib = tmp_path / "calib.txt"
    calib.write_bytes(bytes(range(256)) * 4)
    result = run_cli(source, "--calib", calib, "--out", tmp_path / "out", *FAST)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert first_error_line(result).startswith(f"error: {calib} is not UTF-8 text")


# 3. Too little calibration text ----------------------------------------------------------------------------------

def test_minimum_tokens_rule():
    from quailora_convert.calibration.batches import MIN_TOKENS, minimum_tokens

    assert MIN_TOKENS == 256 and minimum_tokens(128, 512) == 256  # the defaults: 4 x the default rank 64
    assert minimum_tokens(8, 32) == 128 and minimum_tokens(2, 16) == 16  # a small budget: half of it
    assert minimum_tokens(1, 2) == 2


def test_too_few_tokens_are_refused_naming_source_count_and_minimum(tmp_path):
    tok = byte_tokenizer()
    path = tmp_path / "short.txt"
    path.write_text("alpha beta gamma\n")
    with pytest.raises(BadInputError) as error:
        sample_token_sequences(read_texts(str(path)), tok, 8, 32, seed=0)
    message = str(error.value)
    assert message.startswith(f"{path} gives only 3 tokens in 1 sequence (--num-samples 8, --seq-len 32); "
                              "at least 128 are needed"), message
    assert "--num-samples" in message and "longer text" in message
    with pytest.raises(BadInputError, match="^acme/notes gives only 6 tokens"):
        sample_token_sequences(["a b c", "d e f"], tok, 8, 32, seed=0, source="acme/notes")
    # exactly the minimum passes: 8 records of 16 tokens = 128 = minimum_tokens(8, 32)
    texts = [" ".join(["a"] * 16)] * 8
    assert sum(map(len, sample_token_sequences(texts, tok, 8, 32, seed=0))) == 128
    with pytest.raises(BadInputError, match="gives only 127 tokens"):
        sample_token_sequences(texts[:-1] + [" ".join(["a"] * 15)], tok, 8, 32, seed=0)


def test_blank_calibration_is_refused_naming_the_file(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("   \n\n \t \n")
    with pytest.raises(BadInputError, match=rf"^{re.escape(str(blank))} holds no text \(empty or only whitespace\)"):
        sample_token_sequences(read_texts(str(blank)), byte_tokenizer(), 8, 32, seed=0)


def test_short_calibration_through_the_cli(made, tmp_path):
    source, _, _ = made
    short = tmp_path / "short.txt"
    short.write_text("alpha beta gamma\n")
    result = run_cli(source, "--calib", short, "--out", tmp_path / "a", *FAST)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert first_error_line(result).startswith(f"error: {short} gives only 3 tokens in 1 sequence (--num-samples 8, "
                                               "--seq-len 32); at least 128 are needed")


# 4. eval / inspect / push-to-hub validate the bundle first -------------------------------------------------------

def _truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size - 10])
    return path.name


DAMAGES = {
    "no adapter weights": (lambda b: (b / INIT_ADAPTER_WEIGHTS).unlink(),
                           "{b} is not a complete QuAILoRA bundle: missing " + INIT_ADAPTER_WEIGHTS),
    "no adapter config": (lambda b: (b / INIT_ADAPTER_CONFIG).unlink(),
                          "{b} is not a complete QuAILoRA bundle: missing " + INIT_ADAPTER_CONFIG),
    "adapter config not JSON": (lambda b: (b / INIT_ADAPTER_CONFIG).write_text("{\"r\": 4,"),
                                "{b}/" + INIT_ADAPTER_CONFIG + " is not valid JSON (the adapter config; line 1 col 9: "),
    "report not JSON": (lambda b: (b / "quailora_report.json").write_text("{not json"),
                        "{b}/quailora_report.json is not valid JSON (the conversion report; line 1 col 2: "),
    "config not JSON": (lambda b: (b / "config.json").write_text("{"),
                        "config.json at {b}/config.json is not valid JSON (line 1 col 2): "),
    "truncated adapter": (lambda b: _truncate(b / INIT_ADAPTER_WEIGHTS),
                          "{b}/" + INIT_ADAPTER_WEIGHTS + " is truncated ("),
    "truncated base shard": (lambda b: _truncate(sorted(b.glob("model-*.safetensors"))[-1]),
                             "{b}/{name} is truncated ("),
    "adapter not safetensors": (lambda b: (b / INIT_ADAPTER_WEIGHTS).write_bytes(
                                    (16).to_bytes(8, "little") + b"x" * 40),
                                "{b}/" + INIT_ADAPTER_WEIGHTS + " is not a safetensors file"),
}


@pytest.fixture
def damaged(made, tmp_path, request):
    """A copy of the bundle damaged as DAMAGES[request.param] says; (folder, expected message start)."""
    damage, message = DAMAGES[request.param]
    broken = shutil.copytree(made[2], tmp_path / "bundle")
    name = damage(broken)  # the damaged file's name, where the message needs it
    return broken, message.format(b=broken, name=name)


@pytest.mark.parametrize("damaged", list(DAMAGES), indirect=True)
def test_verify_bundle_names_the_missing_or_damaged_file(damaged):
    broken, message = damaged
    with pytest.raises(BadInputError) as error:
        verify_bundle(broken)
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)


@pytest.mark.parametrize("damaged", ["no adapter weights", "adapter config not JSON", "truncated adapter"],
                         indirect=True)
def test_eval_validates_the_bundle_before_loading_any_model(made, damaged, monkeypatch):
    from quailora_convert import evaluate as evaluation
    from quailora_convert.evaluate import EvalSettings

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded before the bundle was checked")

    monkeypatch.setattr(evaluation, "_load_source", never)
    monkeypatch.setattr(evaluation, "_load_bundle", never)
    broken, message = damaged
    with pytest.raises(BadInputError) as error:
        evaluation.evaluate(EvalSettings(bundle=broken, data=str(made[1]), num_samples=4, seq_len=16))
    assert str(error.value).startswith(message), str(error.value)


@pytest.mark.parametrize("damaged", ["no adapter weights"], indirect=True)
def test_eval_of_a_bundle_without_adapter_through_the_cli(made, damaged):
    broken, message = damaged
    result = run_cli("eval", broken, "--data", made[1], "--num-samples", "4", "--seq-len", "16")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert first_error_line(result) == f"error: {message}"


@pytest.mark.parametrize("damaged", ["no adapter weights", "no adapter config", "truncated base shard"], indirect=True)
def test_inspect_shows_then_refuses_an_incomplete_bundle(damaged):
    broken, message = damaged
    result = run_cli("inspect", broken)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert first_error_line(result).startswith(f"error: {message}")
    assert "quantization:" in result.stdout  # what the report says is still shown


@pytest.mark.parametrize("damaged", ["adapter config not JSON", "truncated adapter", "truncated base shard"],
                         indirect=True)
def test_push_to_hub_validates_the_bundle_before_contacting_the_hub(damaged):
    from quailora_convert.publish import push_to_hub

    class NoHub:
        def __getattr__(self, name):
            raise AssertionError(f"the Hub client was used ({name}) before the bundle was checked")

    broken, message = damaged
    with pytest.raises(BadInputError) as error:
        push_to_hub(broken, "alice/tiny", api=NoHub())
    assert str(error.value).startswith(message), str(error.value)
