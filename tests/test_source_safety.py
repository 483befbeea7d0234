"""Pickle-only checkpoints need --allow-pickle; models with their own code need --trust-remote-code. A source
that cannot make a working bundle (a parameter or a listed shard missing) is refused before any heavy work and
in the plan; a --seq-len beyond the model's positions is clamped with a warning (issue 22)."""
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_process import run_cli
from quailora_convert.bundle.layout import INIT_ADAPTER_WEIGHTS
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
    for name in (INIT_ADAPTER_WEIGHTS,):
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


# issue 22: a source that cannot make a working bundle is refused before any heavy work, in the plan too ---------

FAST = ["--rank", "4", "--num-samples", "8", "--seq-len", "32"]


def _weight_map(folder):
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]


def _drop_tensor(folder, key):
    """folder's checkpoint without tensor key (its shard rewritten, the index updated)."""
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = folder / data["weight_map"].pop(key)
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    index.write_text(json.dumps(data))


def _refused_in_plan_and_run(source, calib, out, *extra):
    """The one error line of --dry-run and of the run, which must agree; nothing written."""
    lines = []
    for mode in (["--dry-run"], []):
        result = run_cli(source, "--calib", calib, "--out", out, *FAST, *extra, *mode)
        assert result.returncode == 2, (mode, result.stdout, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
        assert "capturing calibration activations" not in result.stdout  # refused before the heavy work
        lines.append(errors[0])
    assert lines[0] == lines[1], lines
    assert not out.exists() and not out.with_name(out.name + ".quailora-work").exists()
    return lines[0]


def test_an_untied_source_without_its_output_head_is_refused_naming_it(sources, tmp_path):
    safe, _, calib = sources
    broken = shutil.copytree(safe, tmp_path / "src")  # tie_word_embeddings false
    _drop_tensor(broken, "lm_head.weight")
    line = _refused_in_plan_and_run(broken, calib, tmp_path / "out")
    assert line.startswith(f"error: the checkpoint in {broken} has no tensor for lm_head.weight, which the model of "
                           "config.json needs (config.json unties the output head"), line
    assert "tie_word_embeddings" in line and "re-download" in line


def test_every_parameter_the_skeleton_needs_is_checked_but_tied_ones(sources, tmp_path):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from quailora_convert.sources.checkpoint import KeyMap

    safe, _, _ = sources
    keys = list(_weight_map(safe))
    for tie in (True, False):
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(tiny_llama_config(tie_word_embeddings=tie))
        without_head = [k for k in keys if k != "lm_head.weight"]
        key_map = KeyMap(list(model.state_dict()), without_head, model.base_model_prefix)
        if tie:  # the head is the embedding: nothing is missing
            key_map.check_complete(model, safe)
        else:
            with pytest.raises(BadInputError, match=r"no tensor for lm_head\.weight, which"):
                key_map.check_complete(model, safe)
    gaps = [k for k in keys if k not in ("model.layers.1.mlp.up_proj.weight", "model.norm.weight")]
    key_map = KeyMap(list(model.state_dict()), gaps, model.base_model_prefix)
    with pytest.raises(BadInputError, match=r"no tensor for model\.layers\.1\.mlp\.up_proj\.weight, model\.norm\.weight,"
                                            r" which") as error:
        key_map.check_complete(model, safe)
    assert "tie_word_embeddings" not in str(error.value)


def test_a_shard_the_index_lists_but_the_folder_lacks_is_named_before_any_work(sources, tmp_path):
    safe, _, calib = sources
    broken = shutil.copytree(safe, tmp_path / "src")
    shard = broken / _weight_map(broken)["model.layers.1.mlp.down_proj.weight"]  # read at the last layer before
    shard.unlink()
    line = _refused_in_plan_and_run(broken, calib, tmp_path / "out")
    assert line.startswith(f"error: {shard} is missing (the checkpoint lists tensors in it)"), line


def test_a_shard_without_a_tensor_its_index_lists_is_named(sources, tmp_path):
    safe, _, calib = sources
    broken = shutil.copytree(safe, tmp_path / "src")
    index = broken / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = "model.layers.1.self_attn.o_proj.weight"
    other = next(name for name in sorted(set(data["weight_map"].values())) if name != data["weight_map"][key])
    data["weight_map"][key] = other  # a stale index: the tensor is in another file
    index.write_text(json.dumps(data))
    line = _refused_in_plan_and_run(broken, calib, tmp_path / "out")
    assert line.startswith(f"error: {broken / other} lacks {key}, which model.safetensors.index.json lists in it"), line


def _gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(n_embd=128, n_inner=320, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, vocab_size=512, pad_token_id=1, bos_token_id=2, eos_token_id=3)


def _long_text(path, words=3000):
    import random

    rng = random.Random(0)
    path.write_text(" ".join(chr(ord("a") + rng.randrange(26)) * rng.randint(1, 3) for _ in range(words)) + "\n")
    return path


def test_a_seq_len_beyond_the_positions_is_clamped_with_a_warning_in_plan_and_run(tmp_path):
    source = save_tiny(_gpt2_config(), tmp_path / "gpt2")  # 128 learned positions
    text = _long_text(tmp_path / "long.txt")
    args = [source, "--calib", text, "--out", tmp_path / "out", "--rank", "4", "--num-samples", "4", "--seq-len", "512"]
    warning = "warning: --seq-len 512 exceeds the 128 positions of the model (config.json n_positions)"
    plan = run_cli(*args, "--dry-run")
    assert plan.returncode == 0, (plan.stdout, plan.stderr)
    assert warning in plan.stdout + plan.stderr
    assert "calibration: 4 samples, 512 tokens" in plan.stdout, plan.stdout  # 4 x 128, not 4 x 512
    done = run_cli(*args)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert warning in done.stdout + done.stderr
    report = json.loads((tmp_path / "out" / "quailora_report.json").read_text())
    assert report["settings"]["seq_len"] == 128 and report["calibration"]["tokens"] == 4 * 128, report["calibration"]
    # eval clamps the same way: held-out sequences of at most 128 tokens, not an IndexError
    evaluated = run_cli("eval", tmp_path / "out", "--data", text, "--num-samples", "2", "--seq-len", "512")
    assert evaluated.returncode == 0, (evaluated.stdout, evaluated.stderr)
    assert "--seq-len 512 exceeds the 128 positions of the model (config.json n_positions)" in evaluated.stderr
    result = json.loads((tmp_path / "out" / "quailora_eval.json").read_text())
    assert result["tokens"] == 2 * 128 and all(math.isfinite(r["perplexity"]) for r in result["rows"]), result


def test_a_llama_is_calibrated_within_its_positions_and_resumes_with_the_same_command(tmp_path):
    from dataclasses import asdict

    from quailora_convert.convert.preflight import clamp_seq_len

    source = save_tiny(tiny_llama_config(max_position_embeddings=64), tmp_path / "llama")
    settings = dict(model=str(source), calib=str(_long_text(tmp_path / "long.txt")), rank=4, num_samples=4)
    heard = []
    bundle = convert(ConvertSettings(out=tmp_path / "out", seq_len=512, **settings), on_event=heard.append)
    report = json.loads((bundle / "quailora_report.json").read_text())
    assert report["calibration"]["tokens"] == 4 * 64 and report["settings"]["seq_len"] == 64
    assert any("exceeds the 64 positions of the model (config.json max_position_embeddings)" in getattr(e, "message", "")
               for e in heard)
    config = tiny_llama_config(max_position_embeddings=64)
    clamped = [asdict(clamp_seq_len(ConvertSettings(out=tmp_path / "o", seq_len=n, **settings), config, heard.append))
               for n in (64, 512, 100000)]
    assert clamped[0] == clamped[1] == clamped[2]  # the fingerprint sees one value: --resume accepts the command
    kept = clamp_seq_len(ConvertSettings(out=tmp_path / "o", seq_len=32, **settings), config, heard.append)
    assert kept.seq_len == 32
