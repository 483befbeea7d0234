"""--calib-dtype: the calibration forward in the checkpoint's bfloat16 (auto where the device is fast at it) or float32.

The base codes depend only on the weights, so they are the same bytes either way; the corrections are solved
against H of the bfloat16 forward's activations, which must be as good a calibration of the same model.
"""
import json

import pytest
import torch

from cli_process import run_cli
from quailora_convert.convert.capture import calibration_dtype, fast_bfloat16
from tiny_models import save_tiny, tiny_llama_config, write_text_calibration


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("calib_dtype")
    source = save_tiny(tiny_llama_config(num_hidden_layers=3), root / "source", dtype=torch.bfloat16)
    calib = write_text_calibration(root / "calib.jsonl", count=32)
    args = [source, "--calib", calib, "--rank", 8, "--num-samples", 24, "--seq-len", 48, "--batch-size", 4,
            "--device", "cpu"]
    bundles = {}
    for dtype in ("float32", "bfloat16"):
        bundles[dtype] = root / dtype
        done = run_cli(*args, "--calib-dtype", dtype, "--out", bundles[dtype], "--quiet")
        assert done.returncode == 0, done.stderr
    return dict(root=root, args=args, bundles=bundles)


def _report(bundle) -> dict:
    return json.loads((bundle / "quailora_report.json").read_text())


def test_the_base_is_the_same_bytes_and_the_report_names_the_dtype(runs):
    single, half = runs["bundles"]["float32"], runs["bundles"]["bfloat16"]
    shards = sorted(p.name for p in single.glob("model*.safetensors"))
    assert shards and shards == sorted(p.name for p in half.glob("model*.safetensors"))
    for shard in shards:
        assert (single / shard).read_bytes() == (half / shard).read_bytes(), shard
    assert _report(single)["calibration"]["dtype"] == "float32"
    assert _report(half)["calibration"]["dtype"] == "bfloat16"


def test_a_bfloat16_calibration_closes_as_much_error(runs):
    full, half = (_report(runs["bundles"][d]) for d in ("float32", "bfloat16"))
    assert half["summary"]["relative_error_after"] < 0.9
    assert half["summary"]["relative_error_after"] <= 1.1 * full["summary"]["relative_error_after"]
    for a, b in zip(full["modules"], half["modules"]):  # the same modules, each within 20% of the other's error
        assert a["module"] == b["module"]
        assert b["error_after"] / b["error_nearest"] <= 1.2 * a["error_after"] / a["error_nearest"] + 1e-3, a["module"]


def test_a_half_dtype_the_weights_are_not_stored_in_is_one_line(runs, tmp_path):
    source = save_tiny(tiny_llama_config(num_hidden_layers=1), tmp_path / "f32", dtype=torch.float32)
    args = [str(a) for a in runs["args"]]
    args[0] = str(source)
    done = run_cli(*args, "--calib-dtype", "bfloat16", "--out", tmp_path / "out")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.layers.0." in lines[0] and "is stored as float32" in lines[0], lines
    assert "--calib-dtype auto or float32" in lines[0]
    assert not (tmp_path / "out").exists()


def test_auto_picks_bfloat16_only_for_a_bfloat16_checkpoint_on_a_fast_device():
    cpu = torch.device("cpu")
    assert calibration_dtype("auto", torch.float32, cpu) == torch.float32
    assert calibration_dtype("auto", torch.float16, cpu) == torch.float32
    assert calibration_dtype("auto", None, cpu) == torch.float32
    assert calibration_dtype("auto", torch.bfloat16, cpu) == (torch.bfloat16 if fast_bfloat16(cpu) else torch.float32)
    assert calibration_dtype("float32", torch.bfloat16, cpu) == torch.float32
    assert calibration_dtype("bfloat16", torch.float32, cpu) == torch.bfloat16  # refused when a layer is read
