"""A converted bundle loads with plain transformers + PEFT and computes exactly Q + scaling * B @ A."""
import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM

from quailora_convert.bundle.layout import INIT_ADAPTER_DIR
from quailora_convert.convert import ConvertSettings, convert
from reference import assert_bundle_matches_reference, bundle_tensors, dequantize_loaded, dequantize_saved, quantized_linears
from tiny_models import save_tiny, tiny_llama_config, write_text_calibration


@pytest.fixture(scope="module", params=[("nearest", 0), ("gptq", 2)], ids=["nearest", "gptq-refine2"])
def tiny_bundle(tmp_path_factory, request):
    rounding, refine = request.param
    root = tmp_path_factory.mktemp("roundtrip")
    source = save_tiny(tiny_llama_config(), root / "source")
    calib = write_text_calibration(root / "calib.jsonl")
    out = convert(ConvertSettings(model=str(source), out=root / "bundle", calib=str(calib), rank=8, num_samples=16,
                                  seq_len=32, batch_size=4, rounding=rounding, refine=refine,
                                  report_baseline=True))
    return source, out


def test_bundle_loads_with_peft_and_only_lora_trains(tiny_bundle):
    _, bundle = tiny_bundle
    model = AutoPeftModelForCausalLM.from_pretrained(bundle / INIT_ADAPTER_DIR, is_trainable=True)
    linears = quantized_linears(model)
    assert len(linears) == 2 * 7
    assert all(type(m).__name__ == "Linear4bit" for m in linears.values())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2


def test_loaded_base_is_bit_identical_to_saved_q(tiny_bundle):
    _, bundle = tiny_bundle
    model = AutoPeftModelForCausalLM.from_pretrained(bundle / INIT_ADAPTER_DIR)
    saved = bundle_tensors(bundle)
    for name, module in quantized_linears(model).items():
        path = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(dequantize_loaded(module), dequantize_saved(saved, path)), path


def test_bundle_logits_match_float32_reference(tiny_bundle):
    source, bundle = tiny_bundle
    assert_bundle_matches_reference(source, bundle, torch.randint(4, 500, (2, 24)))


def test_report_shows_error_reduction_per_module(tiny_bundle):
    _, bundle = tiny_bundle
    report = json.loads((bundle / "quailora_report.json").read_text())
    assert len(report["modules"]) == 14
    for m in report["modules"]:
        assert m["error_after"] <= m["error_svd_init"] * (1 + 1e-6) <= m["error_before"] * (1 + 1e-6)
        assert m["error_before"] <= m["error_nearest"] * (1 + 1e-6)  # GPTQ codes never worse on the calibration H
        assert m["error_after"] == min(m["refine_errors"]) <= m["refine_errors"][0]
    assert report["summary"]["relative_error_after"] < 0.9
    groups = {m["module"].rsplit(".", 1)[-1]: m["input_group"].rsplit(".", 1)[-1] for m in report["modules"]}
    assert groups["k_proj"] == groups["v_proj"] == "q_proj" and groups["up_proj"] == "gate_proj"
    assert groups["o_proj"] == "o_proj" and groups["down_proj"] == "down_proj"


def test_report_splits_the_time_into_phases(tiny_bundle):
    _, bundle = tiny_bundle
    timings = json.loads((bundle / "quailora_report.json").read_text())["timings"]
    phases = timings["phase_seconds"]
    assert list(phases) == ["read", "forward", "hessian", "quantize", "solve", "write", "other"]
    assert all(seconds >= 0 for seconds in phases.values())
    assert phases["forward"] > 0 and phases["hessian"] > 0 and phases["solve"] > 0 and phases["write"] > 0
    assert sum(phases.values()) == pytest.approx(timings["total_seconds"], rel=1e-6)
