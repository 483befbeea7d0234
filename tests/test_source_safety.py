"""Pickle-only checkpoints need --allow-pickle; models with their own code need --trust-remote-code."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from quailora_convert.convert import ConvertSettings, convert
from quailora_convert.errors import BadInputError, UnsupportedModelError
from quailora_convert.sources.resolve import open_model
from reference import assert_bundle_matches_reference
from tiny_models import save_tiny, tiny_llama_config, write_text_calibration


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same tiny Llama as safetensors and as two pickle shards with a .bin index."""
    root = tmp_path_factory.mktemp("safety")
    safe = save_tiny(tiny_llama_config(), root / "safe", shard_size="300KB")
    pickled = root / "pickled"
    shutil.copytree(safe, pickled, ignore=shutil.ignore_patterns("*.safetensors*"))
    index = json.loads((safe / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    weight_map = {}
    for k, shard in enumerate(shards[:2]):  # regroup into two .bin shards
        names = [s for i, s in enumerate(shards) if i % 2 == k]
        state = {key: tensor for name in names for key, tensor in load_file(safe / name).items()}
        torch.save(state, pickled / f"pytorch_model-0000{k + 1}-of-00002.bin")
        weight_map.update({key: f"pytorch_model-0000{k + 1}-of-00002.bin" for key in state})
    (pickled / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return safe, pickled, write_text_calibration(root / "calib.jsonl")


def _settings(model, out, calib, **extra):
    return ConvertSettings(model=str(model), out=out, calib=str(calib), rank=4, num_samples=8, seq_len=32, **extra)


def test_pickle_only_source_is_refused_without_allow_pickle(sources, tmp_path):
    _, pickled, calib = sources
    with pytest.raises(UnsupportedModelError, match="--allow-pickle"):
        convert(_settings(pickled, tmp_path / "out", calib))
    assert not (tmp_path / "out").exists()


def test_allow_pickle_converts_to_the_same_bundle_as_safetensors(sources, tmp_path):
    safe, pickled, calib = sources
    from_safe = convert(_settings(safe, tmp_path / "a", calib))
    from_pickle = convert(_settings(pickled, tmp_path / "b", calib, allow_pickle=True))
    for name in ("adapter_model.safetensors",):
        a, b = load_file(from_safe / name), load_file(from_pickle / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert_bundle_matches_reference(safe, from_pickle, torch.randint(4, 500, (1, 16)))


def test_a_pickle_source_owns_its_converted_copy_and_removes_it(sources):
    _, pickled, _ = sources
    with open_model(str(pickled), allow_pickle=True) as source:
        assert source.folder != pickled and (source.folder / "model.safetensors.index.json").is_file()
    assert not source.folder.exists()
    assert (pickled / "pytorch_model.bin.index.json").is_file()  # the user's folder is untouched


def test_remote_code_needs_trust(sources, tmp_path):
    safe, _, calib = sources
    custom = tmp_path / "custom"
    shutil.copytree(safe, custom)
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (custom / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadInputError, match="--trust-remote-code") as error:
        convert(_settings(custom, tmp_path / "out", calib))
    assert "modeling_custom.CustomForCausalLM" in str(error.value)
    assert not (tmp_path / "out").exists()
