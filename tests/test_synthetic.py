"""benchmarks/synthetic.py: real models' shapes, config and sharding, streamed shard by shard, reproducible."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from paths import REPO
from quailora_convert.bundle.layout import CONFIG, SAFETENSORS_INDEX, read_weight_map

sys.path.insert(0, str(REPO / "benchmarks"))
import synthetic  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "tiny"
    return out, synthetic.write_checkpoint(synthetic.PRESETS["tiny"], out, seed=0)


def test_tiny_checkpoint_loads_with_its_shapes_dtype_and_index(tiny):
    out, written = tiny
    preset = synthetic.PRESETS["tiny"]
    model = AutoModelForCausalLM.from_pretrained(out)
    expected = synthetic.tensor_shapes(synthetic.llama_config(preset))
    assert {k: v.shape for k, v in model.state_dict().items()} == expected
    assert model.dtype == torch.bfloat16 and model.config.num_key_value_heads == 2
    weight_map = read_weight_map(out / SAFETENSORS_INDEX)
    assert set(weight_map) == set(expected) and written["tensors"] == len(expected)
    shards = sorted(set(weight_map.values()))
    assert len(shards) == written["shards"] > 1
    limit = 300_000  # the tiny preset's "300KB"
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
        data = sum(2 * torch.Size(s).numel() for s in sizes)
        assert data <= limit or len(sizes) == 1
    total = json.loads((out / SAFETENSORS_INDEX).read_text())["metadata"]["total_size"]
    assert total == written["bytes"] == sum(2 * s.numel() for s in expected.values())


def test_weights_look_like_a_trained_checkpoints(tiny):
    out, _ = tiny
    state = AutoModelForCausalLM.from_pretrained(out).state_dict()
    W = state["model.layers.0.mlp.down_proj.weight"].float()  # (out, in)
    column_max = W.abs().amax(0)
    outliers = column_max > 10 * column_max.median()
    assert 1 <= outliers.sum() <= max(1, W.shape[1] // synthetic.OUTLIER_EVERY)
    assert abs(W[:, ~outliers].std().item() - synthetic.WEIGHT_STD) < 0.002
    norm = state["model.layers.0.input_layernorm.weight"].float()
    assert abs(norm.mean().item() - 1) < 0.02 and norm.std().item() < 0.1


def test_seeded_and_reproducible(tiny, tmp_path):
    out, _ = tiny
    again = tmp_path / "again"
    other = tmp_path / "other"
    synthetic.write_checkpoint(synthetic.PRESETS["tiny"], again, seed=0)
    synthetic.write_checkpoint(synthetic.PRESETS["tiny"], other, seed=1)
    for shard in sorted(set(read_weight_map(out / SAFETENSORS_INDEX).values())):
        assert (out / shard).read_bytes() == (again / shard).read_bytes()
        assert (out / shard).read_bytes() != (other / shard).read_bytes()


def test_refuses_a_non_empty_folder(tiny):
    out, _ = tiny
    before = (out / CONFIG).read_bytes()
    with pytest.raises(SystemExit, match="not empty"):
        synthetic.write_checkpoint(synthetic.PRESETS["tiny"], out)
    assert (out / CONFIG).read_bytes() == before


def test_tokenizer_covers_the_vocabulary_and_calibration_text_tokenizes(tiny, tmp_path):
    out, _ = tiny
    preset = synthetic.PRESETS["tiny"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == preset.vocab_size
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    text = synthetic.calibration_text(preset, tmp_path / "calib.txt", words=500).read_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) >= 500 and tokenizer.unk_token_id not in ids and max(ids) < preset.vocab_size


def test_real_presets_shard_like_the_originals():
    """Llama-2-7B: 2 shards of at most 10GB, 13,476,831,232 bytes (the original's index, less its rotary
    buffers); Llama-3-8B: 4 shards under 5GB, GQA, a 128256-word vocabulary with its specials at their ids."""
    llama2 = synthetic.llama_config(synthetic.PRESETS["llama-2-7b"])
    split = synthetic.split_into_shards(synthetic.tensor_shapes(llama2), "10GB")
    assert len(split.filename_to_tensors) == 2 and split.metadata["total_size"] == 13_476_831_232
    preset = synthetic.PRESETS["llama-3-8b"]
    shapes = synthetic.tensor_shapes(synthetic.llama_config(preset))
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (1024, 4096)
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (14336, 4096)
    assert len(synthetic.split_into_shards(shapes, preset.max_shard_size).filename_to_tensors) == 4
    vocab = synthetic.vocabulary(preset)
    assert sorted(vocab.values()) == list(range(128256))
    assert vocab["<|begin_of_text|>"] == 128000 and len(set(vocab)) == 128256
    sliced = synthetic.preset_with_layers("llama-2-70b-slice", 2)
    shapes = synthetic.tensor_shapes(synthetic.llama_config(sliced))
    assert shapes["model.layers.1.mlp.down_proj.weight"] == (8192, 28672)
    assert "model.layers.2.mlp.up_proj.weight" not in shapes
