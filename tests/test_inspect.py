"""`quailora-convert inspect DIR`: a bundle's summary as text and JSON; one line for a non-bundle."""
import json

import pytest
from typer.testing import CliRunner

from bundles import make_bundle
from cli_process import run_cli
from quailora_cli.main import app  # importing main registers every command


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("inspect"), solver="als", als_steps=2)[1]


def test_inspect_json_describes_the_bundle(bundle):
    result = CliRunner().invoke(app, ["inspect", str(bundle), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    report = json.loads((bundle / "quailora_report.json").read_text())
    assert info["source"]["model"] == report["source"]["model"] and info["source"]["commit"] is None
    assert info["quantization"] == {"bits": 4, "type": "nf4"}
    assert info["lora"]["rank"] == 4 and info["lora"]["alpha"] == 16.0 and info["lora"]["use_rslora"] is False
    assert info["solver"] == {"name": "als", "als_steps": 2, "damp": report["settings"]["damp"]}
    assert info["calibration"]["samples"] == 8 and info["calibration"]["tokens"] == report["calibration"]["tokens"]
    assert info["error"]["modules"] == 14
    assert info["error"]["reduction"] == pytest.approx(1 - report["summary"]["relative_error_after"])
    assert info["complete"] is True and info["eval"] is None and info["card"] is True
    assert info["lora"]["folder"] == "quailora_init" and info["lora"]["base_model_name_or_path"] == str(bundle)
    assert info["versions"]["peft"] == report["versions"]["peft"]


def test_inspect_text_through_the_console_script(bundle, tmp_path):
    result = run_cli("inspect", bundle)
    assert result.returncode == 0, result.stderr
    assert "nf4 (4-bit)" in result.stdout and "rank 4, alpha 16.0" in result.stdout and "als (2 steps)" in result.stdout
    assert "14 modules" in result.stdout and "eval:" in result.stdout and "none" in result.stdout
    assert "quantized base at the root, adapter in quailora_init/" in result.stdout

    (bundle / "quailora_eval.json").write_text(json.dumps({"rows": [{"model": "bundle", "perplexity": 9.5}],
                                                          "gap_closed": 0.5, "data": "x"}))
    try:
        result = run_cli("inspect", bundle)
    finally:
        (bundle / "quailora_eval.json").unlink()
    assert "perplexity bundle 9.500; gap closed 50.0%" in result.stdout


def test_inspect_refuses_a_folder_that_is_not_a_bundle(tmp_path):
    result = run_cli("inspect", tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path} is not a QuAILoRA bundle: quailora_report.json is missing"]


def test_inspect_refuses_a_bundle_of_the_old_layout_in_one_line(bundle, tmp_path):
    """The adapter at the root (before quailora_init/): transformers would attach it on every load."""
    import shutil

    old = shutil.copytree(bundle, tmp_path / "old")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (old / "quailora_init" / name).rename(old / name)
    (old / "quailora_init").rmdir()
    result = run_cli("inspect", old)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: {old} has its adapter at the root (adapter_config.json), the layout of quailora-convert before "
        "quailora_init/: convert the model again with this version"]
