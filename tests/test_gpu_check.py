"""benchmarks/gpu_check.py --tiny on CPU (the command a GPU's first minutes run), and the bf16-input H option."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bundles import make_bundle
from paths import REPO
from quailora_convert.bundle.layout import INIT_ADAPTER_DIR, REPORT
from quailora_convert.convert import ConvertSettings, convert
from quailora_convert.core.hessian import HessianSum


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--tiny", "--out", str(out),
                           "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "gpu_check.json").read_text()), done.stdout


def test_tiny_check_measures_every_step(tiny_check):
    out, results, table = tiny_check
    s = results["summary"]
    for key in ("conversion_wall_seconds", "forward_seconds", "floor_seconds", "floor_bf16_hessian_seconds",
                "ratio_to_forward", "ratio_to_floor", "calibrated_error", "peak_rss_bytes", "solve_seconds",
                "conversion_peak_rss_bytes", "bf16_hessian_wall_seconds"):
        assert s[key] > 0, key
    assert s["ratio_to_forward"] == pytest.approx(s["conversion_wall_seconds"] / s["forward_seconds"])
    assert s["ratio_to_floor"] == pytest.approx(s["conversion_wall_seconds"] / s["floor_seconds"])
    assert s["floor_seconds"] > s["forward_seconds"] * 0.5  # the floor runs the same forward, plus H
    assert s["logits_finite"] is True
    assert results["load"]["with_adapter"] == (out / "bundle" / INIT_ADAPTER_DIR).is_dir()
    conversion = results["conversion"]
    report = json.loads((out / "bundle" / REPORT).read_text())
    assert s["calibrated_error"] == report["summary"]["error_after"] > 0
    assert set(conversion["phase_seconds"]) >= {"read", "forward", "hessian", "solve", "write", "other"}
    assert conversion["tokens"] == results["measure"]["tokens"] > 0  # the same batches were timed
    assert results["measure"]["floor_float32"]["floor_positions"] == results["measure"]["padded_tokens"]
    assert abs(s["bf16_hessian_relative_error_difference"]) < 1e-3
    assert s["peak_gpu_bytes"] == 0 and s["conversion_peak_gpu_bytes"] is None  # CPU: no CUDA memory to report
    v = results["versions"]
    assert v["torch"] == torch.__version__ and v["bitsandbytes"] and v["device_name"]
    assert "| conversion wall |" in table and "| peak host RSS |" in table


def test_a_rerun_reuses_the_checkpoint(tiny_check):
    import argparse

    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    out, results, _ = tiny_check
    assert "wall_seconds" in results["synthetic"]  # the first run wrote it
    shards = {p: p.stat().st_mtime_ns for p in (out / "source").glob("*.safetensors")}
    again = gpu_check.Check(argparse.Namespace(out=out, preset="tiny", layers=None, device="cpu"))
    assert gpu_check.prepare_source(again) == out / "source"
    assert again.results["synthetic"] == {"reused": True}
    assert {p: p.stat().st_mtime_ns for p in (out / "source").glob("*.safetensors")} == shards
    other = gpu_check.Check(argparse.Namespace(out=out, preset="tiny", layers=1, device="cpu"))
    with pytest.raises(SystemExit, match="another or an unfinished checkpoint"):
        gpu_check.prepare_source(other)


def test_bf16_hessian_sum_is_float32_accumulation_of_rounded_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 256, generator=g) * torch.exp(torch.randn(256, generator=g))  # (batch, seq, in)
    mask = torch.rand(3, 40, generator=g) > 0.2
    exact, rounded = HessianSum(256, "cpu"), HessianSum(256, "cpu", torch.bfloat16)
    exact.add(x, mask)
    rounded.add(x, mask)
    X = x[mask].bfloat16().double()  # (tokens, in)
    reference = (X.T @ X / X.shape[0]).float()
    assert torch.allclose(rounded.mean(), reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
    relative = (rounded.mean() - exact.mean()).norm() / exact.mean().norm()
    assert 1e-5 < relative < 1e-2  # bf16 rounds X (8 bits of mantissa) but the sum stays float32


def _files(bundle):
    """Every safetensors file's bytes, and the adapter config but for its base path (the bundle's own folder)."""
    configs = {p.relative_to(bundle): {k: v for k, v in json.loads(p.read_text()).items()
                                       if k != "base_model_name_or_path"}
               for p in sorted(bundle.rglob("adapter_config.json"))}
    return {p.relative_to(bundle): p.read_bytes() for p in sorted(bundle.rglob("*.safetensors"))} | configs


def test_hessian_dtype_float32_is_the_default_byte_for_byte_and_bfloat16_within_1e_3(tmp_path):
    source, default = make_bundle(tmp_path, calib_dtype="float32")
    common = dict(model=str(source), calib=str(tmp_path / "calib.jsonl"), rank=4, num_samples=8, seq_len=32,
                  batch_size=4, max_shard_bytes=150_000, calib_dtype="float32")
    explicit = convert(ConvertSettings(out=tmp_path / "explicit", hessian_dtype="float32", **common))
    bf16 = convert(ConvertSettings(out=tmp_path / "bf16", hessian_dtype="bfloat16", **common))
    assert _files(default) == _files(explicit) and len(_files(default)) >= 3
    errors = [json.loads((b / REPORT).read_text())["summary"]["error_after"] for b in (default, bf16)]
    assert abs(errors[1] / errors[0] - 1) < 1e-3
    assert _files(bf16) != _files(default)  # the option reaches the H update
    assert json.loads((bf16 / REPORT).read_text())["settings"]["hessian_dtype"] == "bfloat16"


def test_activations_stay_on_a_cuda_device_only_within_a_quarter_of_its_free_memory():
    from quailora_convert.convert.capture import DEVICE_ACTIVATIONS_SHARE, activations_on_device

    gib = 1 << 30
    llama_7b = 128 * 2048 * 4096 * 2  # 128 x 2048 tokens of bfloat16 hidden states: 2 GiB
    assert llama_7b == 2 * gib
    assert activations_on_device(llama_7b, "cuda", 139 * gib)  # an H200
    assert not activations_on_device(llama_7b, "cuda", 6 * gib)  # a small card: to the host and back
    assert activations_on_device(llama_7b, "cuda", int(llama_7b / DEVICE_ACTIVATIONS_SHARE))  # the boundary
    assert not activations_on_device(llama_7b, "cuda", int(llama_7b / DEVICE_ACTIVATIONS_SHARE) - 1)
    assert not activations_on_device(1, "cpu", 1 << 50)  # the host is the device


def test_kept_activations_replay_exactly_like_host_ones(tmp_path):
    """keep_on_device keeps each layer's inputs where they were made; on CPU both paths must agree bit for bit
    (on CUDA the kept path skips the pinned copies: not run here)."""
    from transformers import AutoModelForCausalLM

    from quailora_convert.calibration.batches import make_batches
    from quailora_convert.convert.architectures import find_decoder_layers, linear_modules
    from quailora_convert.convert.capture import accumulate_hessians, activation_bytes, capture_layer_calls
    from tiny_models import tiny_llama_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config()).eval()
    sequences = [torch.randint(4, 500, (n,)).tolist() for n in (20, 17, 9, 12)]
    batches = make_batches(sequences, 2, 1)
    assert activation_bytes(batches, 128, torch.float32) == 2 * 20 * 128 * 4 + 2 * 12 * 128 * 4
    _, layers = find_decoder_layers(model)
    runs = []
    for keep in (False, True):
        with torch.no_grad():
            hidden, calls = capture_layer_calls(model, layers, batches, torch.device("cpu"), keep_on_device=keep)
            sums = [accumulate_hessians(layer, linear_modules(layer), hidden, calls[i], batches, torch.device("cpu"))
                    for i, layer in enumerate(layers)]
        runs.append((hidden, [s.sum for h in sums for s in h.sums.values()]))
    (h0, s0), (h1, s1) = runs
    assert all(torch.equal(a, b) for a, b in zip(h0, h1)) and all(torch.equal(a, b) for a, b in zip(s0, s1))


def test_the_dry_run_plan_says_where_activations_wait(tmp_path):
    from quailora_convert.convert.pipeline import dry_run
    from tiny_models import save_tiny, tiny_llama_config, write_text_calibration

    source = save_tiny(tiny_llama_config(), tmp_path / "source")
    calib = write_text_calibration(tmp_path / "calib.jsonl")
    plan = dry_run(ConvertSettings(model=str(source), out=tmp_path / "bundle", calib=str(calib), rank=4,
                                   num_samples=8, seq_len=32, batch_size=4, device="cpu"))
    assert plan.activations_on == "host" and plan.as_json()["activations_on"] == "host"
    assert not (tmp_path / "bundle").exists()
