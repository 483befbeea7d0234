"""End to end on the real SmolLM2-135M-Instruct (Llama, 30 layers, 6 shards), small calibration budget."""
import json
import subprocess
import sys
from pathlib import Path

import bitsandbytes.functional as bnbF
import pytest
import torch
from peft import AutoPeftModelForCausalLM
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from quailora_convert.bundle.layout import INIT_ADAPTER_DIR
from quailora_convert.convert import ConvertSettings, convert
from paths import SHARED
from reference import assert_bundle_matches_reference, dequantize_loaded, quantized_linears

pytestmark = pytest.mark.slow
LINEARS_PER_LAYER = 7


@pytest.fixture(scope="module")
def smollm2() -> Path:
    script = SHARED / "scripts" / "smollm2.py"
    if not script.exists():
        pytest.skip(f"needs the workplace's ../shared/scripts/smollm2.py ({script} missing)")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def bundles(smollm2, alpaca_calib, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    made = {}
    variants = {4: dict(bits=4, rounding="nearest", refine=0, report_baseline=True),
                8: dict(bits=8, rounding="gptq", refine=1),
                "gptq": dict(bits=4, rounding="gptq", refine=1)}
    for name, options in variants.items():
        made[name] = convert(ConvertSettings(model=str(smollm2), out=root / f"b{name}", calib=str(alpaca_calib),
                                             rank=16, num_samples=12, seq_len=128, batch_size=4,
                                             calib_dtype="float32", **options))  # bfloat16: test_calib_dtype
    return made


def _source_weight(folder: Path, key: str) -> torch.Tensor:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    with safe_open(str(folder / index["weight_map"][key]), "pt") as f:
        return f.get_tensor(key)


def test_base_loads_with_no_missing_or_unexpected_keys(bundles):
    model, info = AutoModelForCausalLM.from_pretrained(bundles[4], output_loading_info=True)  # the base alone
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not hasattr(model, "peft_config")


def test_peft_one_liner_gives_linear4bit_and_lora_only_training(bundles):
    model = AutoPeftModelForCausalLM.from_pretrained(bundles[4] / INIT_ADAPTER_DIR, is_trainable=True)
    linears = quantized_linears(model)
    assert len(linears) == 30 * LINEARS_PER_LAYER
    assert all(type(m).__name__ == "Linear4bit" for m in linears.values())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 30 * LINEARS_PER_LAYER
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_loaded_base_equals_bnb_quantization_of_the_source(bundles, smollm2):
    model = AutoPeftModelForCausalLM.from_pretrained(bundles[4] / INIT_ADAPTER_DIR)
    for name, module in quantized_linears(model).items():
        path = name.replace("base_model.model.", "").replace(".base_layer", "")
        packed, state = bnbF.quantize_4bit(_source_weight(smollm2, f"{path}.weight"), blocksize=64,
                                           compress_statistics=True, quant_type="nf4")
        assert torch.equal(dequantize_loaded(module), bnbF.dequantize_4bit(packed, state)), path


def test_logits_match_float32_reference(bundles, smollm2):
    ids = torch.randint(100, 40000, (2, 32), generator=torch.Generator().manual_seed(0))
    assert_bundle_matches_reference(smollm2, bundles[4], ids, atol=2e-3)  # 30 layers of float32 rounding


def test_gptq_bundle_matches_reference_and_rounds_better_on_every_module(bundles, smollm2):
    ids = torch.randint(100, 40000, (2, 32), generator=torch.Generator().manual_seed(1))
    assert_bundle_matches_reference(smollm2, bundles["gptq"], ids, atol=2e-3)
    gptq = json.loads((bundles["gptq"] / "quailora_report.json").read_text())
    nearest = {m["module"]: m for m in json.loads((bundles[4] / "quailora_report.json").read_text())["modules"]}
    assert len(gptq["modules"]) == 30 * LINEARS_PER_LAYER
    for m in gptq["modules"]:
        assert m["error_nearest"] == pytest.approx(nearest[m["module"]]["error_before"], rel=1e-9), m["module"]
        assert m["error_before"] <= m["error_nearest"], m["module"]  # GPTQ codes vs bnb's, on the calibration H
        assert m["error_after"] == min(m["refine_errors"]), m["module"]
    assert gptq["summary"]["error_after"] < 0.9 * json.loads(
        (bundles[4] / "quailora_report.json").read_text())["summary"]["error_after"]


def test_report_objectives_are_ordered_and_activation_aware(bundles):
    report = json.loads((bundles[4] / "quailora_report.json").read_text())
    assert len(report["modules"]) == 30 * LINEARS_PER_LAYER
    for m in report["modules"]:
        assert m["error_after"] <= m["error_svd_init"] * (1 + 1e-6), m["module"]
        assert m["error_svd_init"] <= m["error_before"] * (1 + 1e-6), m["module"]
    q0 = next(m for m in report["modules"] if m["module"] == "model.layers.0.self_attn.q_proj")
    assert q0["error_after"] < 0.5 * q0["error_svd_init"]  # activation space beats weight space by far


def test_int8_bundle_loads_and_adapter_lowers_error(bundles):
    model = AutoPeftModelForCausalLM.from_pretrained(bundles[8] / INIT_ADAPTER_DIR, is_trainable=True)
    linears = quantized_linears(model)
    assert len(linears) == 30 * LINEARS_PER_LAYER
    assert all(type(m).__name__ == "Linear8bitLt" for m in linears.values())
    report = json.loads((bundles[8] / "quailora_report.json").read_text())
    assert all(m["error_after"] < m["error_before"] <= m["error_nearest"] for m in report["modules"])
    assert report["summary"]["relative_error_after"] < 0.9
