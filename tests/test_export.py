"""`export`: a really fine-tuned adapter of a tiny float32 bundle, exported merged and as a LoRA for the source.

References are built here from the source weights, the bundle's stored tensors and the adapters' files
(tests/reference.py), never from the exporter's code.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cli_process import run_cli
from quailora_convert.bundle.layout import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, CONFIG, INIT_ADAPTER_DIR,
                                            SAFETENSORS_INDEX, read_weight_map)
from quailora_convert.convert import ConvertSettings, convert
from quailora_convert.errors import BadInputError
from quailora_convert.export import MIN_INIT_ALIGNMENT, export_lora_for_source, export_merged, open_inputs
from reference import bundle_tensors, dequantize_saved, use_float32_compute
from tiny_models import VOCAB, save_tiny, tiny_llama_config, write_text_calibration

ATOL = 1e-4  # float32 forwards of the same weights, summed in other orders


def make_float32_bundle(root: Path, seed: int = 0, **settings) -> tuple[Path, Path]:
    source = save_tiny(tiny_llama_config(), root / "source", dtype=torch.float32, seed=seed)
    calib = write_text_calibration(root / "calib.jsonl")
    values = dict(model=str(source), out=root / "bundle", calib=str(calib), rank=4, num_samples=8, seq_len=32,
                  batch_size=4, max_shard_bytes=150_000)
    values.update(settings)
    return source, convert(ConvertSettings(**values))


def load_tuned_qlora(bundle: Path, adapter: Path | None = None, trainable: bool = False):
    """The bundle's 4-bit base with ADAPTER (default: its init adapter), float32 compute, train mode."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(bundle, dtype=torch.float32)
    if adapter is None:
        model = PeftModel.from_pretrained(base, bundle, subfolder=INIT_ADAPTER_DIR, is_trainable=trainable)
    else:
        model = PeftModel.from_pretrained(base, adapter, is_trainable=trainable)
    use_float32_compute(model)
    return model.train()  # no dropout in our adapters; eval mode on AVX512-BF16 CPUs repacks the 4-bit weights


def fine_tune(bundle: Path, out: Path, lr: float, steps: int = 20, seed: int = 0) -> Path:
    """A real fine-tune: AdamW on next-token loss over random token batches, saved by PEFT."""
    model = load_tuned_qlora(bundle, trainable=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(4, VOCAB, (4, 32), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    return out


def adapter_factors(folder: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """module path -> (lora_A, lora_B) in float32, and the adapter config."""
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    with safe_open(str(folder / ADAPTER_WEIGHTS), "pt") as f:
        tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    modules = {k[len("base_model.model."):-len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")}
    return {m: (tensors[f"base_model.model.{m}.lora_A.weight"], tensors[f"base_model.model.{m}.lora_B.weight"])
            for m in modules}, config


def module_scaling(config: dict, path: str, rank: int) -> float:
    """PEFT's scaling of one module, by leaf name or full path in alpha_pattern."""
    patterns = config.get("alpha_pattern") or {}
    alpha = patterns.get(path, patterns.get(path.rsplit(".", 1)[-1], config["lora_alpha"]))
    return alpha / (rank ** 0.5 if config["use_rslora"] else rank)


def reference(source: Path, weights) -> torch.nn.Module:
    """The float32 source with every adapted linear's weight replaced by weights(path, W) (out, in)."""
    from transformers import AutoModelForCausalLM

    from transformers.pytorch_utils import Conv1D

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    for path, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            transposed = isinstance(module, Conv1D)  # GPT-2 stores (in, out)
            W = weights(path, module.weight.detach().T if transposed else module.weight.detach())
            if W is not None:
                with torch.no_grad():
                    module.weight.copy_(W.T if transposed else W)
    return model.eval()


def merged_reference(source: Path, bundle: Path, adapter: Path) -> torch.nn.Module:
    """dequant(Q) + scaling * B' A' for every adapted linear, the rest of the source as is."""
    stored = bundle_tensors(bundle)
    tuned, config = adapter_factors(adapter)

    def weights(path, W):
        if path not in tuned:
            return None
        A, B = tuned[path]
        return dequantize_saved(stored, path, torch.float32) + module_scaling(config, path, A.shape[0]) * B @ A
    return reference(source, weights)


def source_lora_reference(source: Path, bundle: Path, adapter: Path) -> torch.nn.Module:
    """W + scaling * (B' A' - B0 A0) = Q + scaling B' A' + (W - Q - scaling B0 A0) for every adapted linear."""
    tuned, config = adapter_factors(adapter)
    init, _ = adapter_factors(bundle / INIT_ADAPTER_DIR)

    def weights(path, W):
        if path not in tuned:
            return None
        (A, B), (A0, B0) = tuned[path], init[path]
        return W + module_scaling(config, path, A.shape[0]) * (B @ A - B0 @ A0)
    return reference(source, weights)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("use_rslora", [False, True])
def test_difference_factors_keep_the_scaled_difference(use_rslora):
    from quailora_convert.core.lora import alpha_for_doubled_rank, difference_factors, lora_scaling

    g = torch.Generator().manual_seed(0)
    A, B, A0, B0 = (torch.randn(shape, generator=g) for shape in [(8, 96), (64, 8), (8, 96), (64, 8)])
    lora_A, lora_B = difference_factors(A, B, A0, B0)
    assert lora_A.shape == (16, 96) and lora_B.shape == (64, 16)
    scaling = lora_scaling(16.0, 8, use_rslora)
    doubled = lora_scaling(alpha_for_doubled_rank(16.0, use_rslora), 16, use_rslora)
    assert doubled == pytest.approx(scaling, rel=1e-12)
    torch.testing.assert_close(doubled * lora_B @ lora_A, scaling * (B @ A - B0 @ A0), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(source, bundle, adapter fine-tuned 20 AdamW steps at lr 1e-2, the same at lr 2e-4)."""
    root = tmp_path_factory.mktemp("export")
    source, bundle = make_float32_bundle(root)
    return (source, bundle, fine_tune(bundle, root / "tuned", lr=1e-2),
            fine_tune(bundle, root / "tuned-slow", lr=2e-4, seed=1))


@pytest.fixture(scope="module")
def ids():
    return torch.randint(4, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))


def test_fine_tuning_moved_the_adapter_and_kept_its_fingerprint(tuned, ids):
    source, bundle, adapter, slow = tuned
    before = logits(load_tuned_qlora(bundle), ids)
    after = logits(load_tuned_qlora(bundle, adapter), ids)
    assert (after - before).abs().max() > 100 * ATOL  # the exports below check something fine-tuning changed
    for trained in (adapter, slow):
        with open_inputs(trained, bundle) as inputs:
            worst = min(inputs.init_cosines.values())
            print(f"{trained.name}: alignment with the init {inputs.init_alignment:.1f} sd, worst cosine {worst:.3f}")
            assert inputs.init_alignment > 2 * MIN_INIT_ALIGNMENT


def test_merged_checkpoint_computes_the_fine_tuned_qlora_model(tuned, ids, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, bundle, adapter, _ = tuned
    out = export_merged(adapter, bundle, tmp_path / "merged", max_shard_bytes=200_000)
    config = json.loads((out / CONFIG).read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert len(set(read_weight_map(out / SAFETENSORS_INDEX).values())) > 1  # sharded, with an index
    assert AutoTokenizer.from_pretrained(out)("a b").input_ids  # the tokenizer came along
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # the staging folder was renamed

    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, its own dtype
    assert next(merged.parameters()).dtype == torch.float32
    got = logits(merged.eval(), ids)
    want = logits(merged_reference(source, bundle, adapter), ids)
    qlora = logits(load_tuned_qlora(bundle, adapter), ids)
    print(f"merged: max |logit diff| vs float32 reference {(got - want).abs().max():.2e}, "
          f"vs the 4-bit model with the adapter {(got - qlora).abs().max():.2e}")
    assert torch.allclose(got, want, atol=ATOL, rtol=0)
    assert torch.allclose(got, qlora, atol=ATOL, rtol=0)


def test_lora_for_source_is_the_fine_tuning_without_the_correction(tuned, ids, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    source, bundle, adapter, _ = tuned
    out = export_lora_for_source(adapter, bundle, tmp_path / "lora")
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    tuned_config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(source)
    assert config["r"] == 2 * tuned_config["r"] and config["lora_alpha"] == 2 * tuned_config["lora_alpha"]

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32), out)
    got = logits(model.eval(), ids)
    want = logits(source_lora_reference(source, bundle, adapter), ids)
    print(f"lora-for-source: max |logit diff| vs float32 reference {(got - want).abs().max():.2e}")
    assert torch.allclose(got, want, atol=ATOL, rtol=0)
    with model.disable_adapter():
        assert not torch.allclose(logits(model, ids), want, atol=100 * ATOL)  # the adapter does something


def test_lora_for_source_is_what_peft_writes_for_a_converted_init(tuned, tmp_path):
    """PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) on the float32 source, byte for byte."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    source, bundle, adapter, _ = tuned
    ours = export_lora_for_source(adapter, bundle, tmp_path / "ours")
    initial = tmp_path / "peft" / "initial"
    shutil.copytree(bundle / INIT_ADAPTER_DIR, initial)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32), adapter)
    model.save_pretrained(tmp_path / "peft" / "converted", path_initial_model_for_weight_conversion=str(initial))
    theirs = tmp_path / "peft" / "converted"
    (our_factors, our_config), (peft_factors, peft_config) = adapter_factors(ours), adapter_factors(theirs)
    assert our_factors.keys() == peft_factors.keys()
    for path, (A, B) in our_factors.items():
        assert torch.equal(A, peft_factors[path][0]) and torch.equal(B, peft_factors[path][1])
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora"):
        assert our_config[key] == peft_config[key], key
    assert sorted(our_config["target_modules"]) == sorted(peft_config["target_modules"])


@pytest.mark.parametrize("use_rslora", [False, True])
def test_rank_pattern_with_and_without_rslora_keeps_every_modules_scaling(tmp_path, ids, use_rslora):
    """rank 100 > the k/v width 64: rank_pattern and alpha_pattern, doubled (PEFT refuses them under rsLoRA)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    source, bundle = make_float32_bundle(tmp_path, rank=100, use_rslora=use_rslora)
    assert json.loads((bundle / INIT_ADAPTER_DIR / ADAPTER_CONFIG).read_text())["rank_pattern"] == {"k_proj": 64,
                                                                                                   "v_proj": 64}
    adapter = fine_tune(bundle, tmp_path / "tuned", lr=1e-2, steps=5)
    out = export_lora_for_source(adapter, bundle, tmp_path / "lora")
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["r"] == 200 and config["rank_pattern"] == {"k_proj": 128, "v_proj": 128}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32), out)
    k_proj = model.base_model.model.model.layers[0].self_attn.k_proj
    assert k_proj.lora_A["default"].weight.shape == (128, 128)
    got = logits(model.eval(), ids)
    want = logits(source_lora_reference(source, bundle, adapter), ids)
    merged = export_merged(adapter, bundle, tmp_path / "merged")
    got_merged = logits(AutoModelForCausalLM.from_pretrained(merged).eval(), ids)
    want_merged = logits(merged_reference(source, bundle, adapter), ids)
    scaling = 16.0 / (100 ** 0.5 if use_rslora else 100)  # every module's, k/v included
    assert k_proj.scaling["default"] == pytest.approx(scaling)
    print(f"rank 100, rsLoRA {use_rslora}: lora-for-source {(got - want).abs().max():.2e}, merged "
          f"{(got_merged - want_merged).abs().max():.2e} max |logit diff| vs float32 reference")
    assert torch.allclose(got, want, atol=ATOL, rtol=0)
    assert torch.allclose(got_merged, want_merged, atol=ATOL, rtol=0)


def test_a_bfloat16_bundle_merges_in_bfloat16_and_copies_the_rest_as_stored(tmp_path):
    """The init adapter itself (a fine-tune of 0 steps) over a bf16 bundle: each merged linear is
    bf16(dequant(Q) + scaling * B0 A0) computed in float32, every other tensor the bundle's bytes."""
    from bundles import make_bundle

    _, bundle = make_bundle(tmp_path)  # a bf16 source
    out = export_merged(bundle / INIT_ADAPTER_DIR, bundle, tmp_path / "merged")
    assert json.loads((out / CONFIG).read_text())["dtype"] == "bfloat16"
    stored, merged = bundle_tensors(bundle), bundle_tensors(out)
    init, config = adapter_factors(bundle / INIT_ADAPTER_DIR)
    assert set(merged) == {k for k in stored if k.endswith((".weight", ".bias")) and ".weight." not in k}
    for name, tensor in merged.items():
        module = name.removesuffix(".weight")
        if module in init:
            A, B = init[module]
            want = dequantize_saved(stored, module, torch.float32) + module_scaling(config, module, A.shape[0]) * B @ A
            assert torch.equal(tensor, want.to(torch.bfloat16)), name
        else:
            assert tensor.dtype == stored[name].dtype and torch.equal(tensor, stored[name]), name
    exact = export_merged(bundle / INIT_ADAPTER_DIR, bundle, tmp_path / "merged32", dtype=torch.float32)
    assert json.loads((exact / CONFIG).read_text())["dtype"] == "float32"
    assert bundle_tensors(exact)["model.layers.0.mlp.down_proj.weight"].dtype == torch.float32


def _gpt2_source(root: Path) -> Path:
    from test_architectures import _gpt2

    return save_tiny(_gpt2(), root / "source", dtype=torch.float32)


@pytest.mark.parametrize("kind", ["int8", "gpt2"])
def test_int8_bases_and_conv1d_weights_export_too(tmp_path, ids, kind):
    """LLM.int8 bases dequantize from SCB; GPT-2's Conv1D weights go back to their stored (in, out)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if kind == "int8":
        source, bundle = make_float32_bundle(tmp_path, bits=8)
    else:
        source = _gpt2_source(tmp_path)
        bundle = convert(ConvertSettings(model=str(source), out=tmp_path / "bundle", rank=4, num_samples=8, seq_len=32,
                                         batch_size=4, calib=str(write_text_calibration(tmp_path / "calib.jsonl"))))
    adapter = fine_tune(bundle, tmp_path / "tuned", lr=1e-2, steps=5)
    merged = AutoModelForCausalLM.from_pretrained(export_merged(adapter, bundle, tmp_path / "merged")).eval()
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32),
                                     export_lora_for_source(adapter, bundle, tmp_path / "lora")).eval()
    got, qlora = logits(merged, ids), logits(load_tuned_qlora(bundle, adapter), ids)
    want = logits(source_lora_reference(source, bundle, adapter), ids)
    print(f"{kind}: merged vs the quantized model with the adapter {(got - qlora).abs().max():.2e}, "
          f"lora-for-source vs float32 reference {(logits(lora, ids) - want).abs().max():.2e}")
    assert torch.allclose(got, qlora, atol=ATOL, rtol=0)
    assert torch.allclose(logits(lora, ids), want, atol=ATOL, rtol=0)


# -- refusals ------------------------------------------------------------------------------------------------
def test_a_fresh_lora_or_another_bundles_adapter_is_refused(tuned, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    source, bundle, adapter, _ = tuned
    init = json.loads((bundle / INIT_ADAPTER_DIR / ADAPTER_CONFIG).read_text())
    fresh = LoraConfig(r=init["r"], lora_alpha=init["lora_alpha"], target_modules=init["target_modules"],
                       lora_dropout=0.0, task_type="CAUSAL_LM")
    for base, name in ((bundle, "fresh-on-bundle"), (source, "fresh-on-source")):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), fresh)
        model.save_pretrained(tmp_path / name)
    with pytest.raises(BadInputError, match="names the source"):  # trained on the source, says so
        export_merged(tmp_path / "fresh-on-source", bundle, tmp_path / "out")
    with pytest.raises(BadInputError, match=r"at -?[0-5]\.\d standard deviations"):
        export_merged(tmp_path / "fresh-on-bundle", bundle, tmp_path / "out")
    _, other = make_float32_bundle(tmp_path / "other", seed=1)  # another source, same shapes and settings
    with pytest.raises(BadInputError, match="not fine-tuned from this bundle"):
        export_lora_for_source(adapter, other, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_other_settings_and_bad_folders_are_refused_in_one_line(tuned, tmp_path):
    source, bundle, adapter, _ = tuned
    changed = shutil.copytree(adapter, tmp_path / "changed")
    config = json.loads((changed / ADAPTER_CONFIG).read_text())
    (changed / ADAPTER_CONFIG).write_text(json.dumps({**config, "lora_alpha": 32}))
    old_layout = shutil.copytree(bundle, tmp_path / "old-layout")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        (old_layout / INIT_ADAPTER_DIR / name).rename(old_layout / name)
    (old_layout / INIT_ADAPTER_DIR).rmdir()
    cases = [
        (changed, bundle, tmp_path / "out", "lora_alpha 32"),
        (tmp_path / "missing", bundle, tmp_path / "out", "is not a folder"),
        (source, bundle, tmp_path / "out", f"{ADAPTER_CONFIG} is missing"),
        (adapter, source, tmp_path / "out", "is not a complete QuAILoRA bundle"),
        (adapter, old_layout, tmp_path / "out", "at the root .* convert the model again"),
        (adapter, bundle, bundle, "is, holds or lies inside"),
        (adapter, bundle, source, "already exists; choose another folder or pass --overwrite"),
    ]
    for adapter_in, bundle_in, out, message in cases:
        with pytest.raises(BadInputError, match=message) as refused:
            export_merged(adapter_in, bundle_in, out)
        assert "\n" not in str(refused.value)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_overwrite_replaces_only_an_export_and_the_cli_reports_in_one_line(tuned, tmp_path):
    source, bundle, adapter, _ = tuned
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "mine.txt").write_text("not an export")
    with pytest.raises(BadInputError, match="replaces only a checkpoint or adapter folder"):
        export_lora_for_source(adapter, bundle, keep, overwrite=True)
    assert (keep / "mine.txt").read_text() == "not an export"

    out = tmp_path / "lora"
    done = run_cli("export", adapter, "--bundle", bundle, "--lora-for-source", out)
    assert done.returncode == 0, done.stderr
    again = run_cli("export", adapter, "--bundle", bundle, "--lora-for-source", out)
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0, again.stderr
    assert again.stderr.startswith("error: OUT") and "--overwrite" in again.stderr
    (out / "stale.txt").write_text("from before")
    export_lora_for_source(adapter, bundle, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / ADAPTER_WEIGHTS).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora", "notes"]  # nothing left beside OUT
