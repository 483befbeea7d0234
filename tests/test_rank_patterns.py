"""--rank above some modules' size: PEFT's rank_pattern / alpha_pattern keep the bundle loadable and exact."""
from __future__ import annotations

import json
import math

import pytest
import torch

from cli_process import run_cli
from quailora_convert.bundle.layout import INIT_ADAPTER_CONFIG, INIT_ADAPTER_DIR
from quailora_convert.core.lora import lora_scaling, rank_patterns
from tiny_models import save_tiny, tiny_llama_config, write_text_calibration


@pytest.mark.parametrize("use_rslora", [False, True])
def test_clipped_modules_keep_the_scaling_the_solver_divided_out(use_rslora):
    shapes = {"model.layers.0.self_attn.q_proj": (128, 128), "model.layers.0.self_attn.k_proj": (64, 128),
              "model.layers.1.self_attn.k_proj": (64, 128), "model.layers.0.mlp.down_proj": (128, 40),
              "model.layers.1.mlp.down_proj": (128, 320)}
    ranks, alphas = rank_patterns(shapes, 100, 16.0, use_rslora)
    assert ranks == {"k_proj": 64, "model.layers.0.mlp.down_proj": 40}  # a leaf only where every module is clipped
    for key, r in ranks.items():
        effective = alphas[key] / (math.sqrt(r) if use_rslora else r)
        assert effective == pytest.approx(lora_scaling(16.0, 100, use_rslora))
    assert rank_patterns(shapes, 32, 16.0) == ({}, {})


def test_a_rank_above_the_kv_width_gives_a_bundle_peft_loads(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    source = save_tiny(tiny_llama_config(), tmp_path / "source")  # k_proj / v_proj: 64 outputs, the rest 128
    calib = write_text_calibration(tmp_path / "calib.jsonl")
    out = tmp_path / "bundle"
    done = run_cli(source, "--calib", calib, "--out", out, "--rank", 100, "--num-samples", 8, "--seq-len", 32)
    assert done.returncode == 0, done.stderr
    assert "--rank 100 exceeds the size of k_proj (rank 64), v_proj (rank 64)" in done.stderr  # a warning: stderr
    assert f"({INIT_ADAPTER_CONFIG} rank_pattern / alpha_pattern)" in done.stderr
    config = json.loads((out / INIT_ADAPTER_CONFIG).read_text())
    assert config["r"] == 100 and config["rank_pattern"] == {"k_proj": 64, "v_proj": 64}
    assert config["alpha_pattern"] == {"k_proj": 16.0 * 64 / 100, "v_proj": 16.0 * 64 / 100}

    base = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out, subfolder=INIT_ADAPTER_DIR, is_trainable=True)  # a size mismatch raised here before
    k_proj = model.base_model.model.model.layers[0].self_attn.k_proj
    assert k_proj.lora_A["default"].weight.shape == (64, 128)
    assert k_proj.scaling["default"] == pytest.approx(16.0 / 100)  # the scaling the factors were divided by
