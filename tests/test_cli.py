"""The command line: conversion through a real subprocess, and one-line errors with non-zero exits."""
import json
import shutil
import subprocess
import sys
from dataclasses import MISSING, fields

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_process import run_cli
from quailora_cli.main import app
from quailora_convert.bundle.layout import INIT_ADAPTER_CONFIG
from quailora_convert.convert import ConvertSettings
from tiny_models import save_tiny, tiny_llama_config, write_text_calibration


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return save_tiny(tiny_llama_config(), root / "source"), write_text_calibration(root / "calib.jsonl")


def test_convert_through_console_script(tiny, tmp_path):
    source, calib = tiny
    result = run_cli(source, "--calib", calib, "--out", tmp_path / "b", "--rank", "4", "--num-samples", "8",
                     "--seq-len", "32", "--solver", "als", "--als-steps", "5", "--bits", "8", "--use-rslora",
                     "--rounding", "gptq", "--refine", "1")
    assert result.returncode == 0, result.stderr
    assert "bundle written to" in result.stdout
    adapter = json.loads((tmp_path / "b" / INIT_ADAPTER_CONFIG).read_text())
    assert adapter["r"] == 4 and adapter["use_rslora"] is True
    assert adapter["base_model_name_or_path"] == str((tmp_path / "b").resolve())
    report = json.loads((tmp_path / "b" / "quailora_report.json").read_text())
    assert report["quantization"] == {"bits": 8, "type": "int8"}
    assert report["settings"]["solver"] == "als"
    assert report["settings"]["rounding"] == "gptq" and report["settings"]["refine"] == 1
    assert report["summary"]["relative_error_after"] < 1.0
    assert report["summary"]["error_before"] < report["summary"]["error_nearest"]
    assert all(len(m["refine_errors"]) == 2 for m in report["modules"])


@pytest.mark.parametrize("args,message", [
    (["/no/such/model", "--calib", "{calib}", "--out", "{out}"], "no such folder"),
    (["{source}", "--calib", "/no/such.jsonl", "--out", "{out}"], "not a file"),
    (["{source}", "--calib", "{calib}", "--out", "{out}", "--bits", "3"], "--bits"),
    (["{source}", "--calib", "{calib}", "--out", "{out}", "--solver", "magic"], "--solver"),
    (["{source}", "--calib", "{calib}", "--out", "{out}", "--rounding", "stochastic"], "--rounding"),
    (["{source}", "--calib", "{calib}", "--out", "{out}", "--refine", "-1"], "--refine"),
    (["{source}", "--calib", "{calib}", "--out", "{out}", "--gptq-damp", "0"], "--gptq-damp"),
    (["{source}", "--calib", "{calib}", "--out", "{out}", "--target-modules", "nope_proj"], "matches no linear"),
    (["{source}", "--calib", "{calib}", "--out", "{out}", "--device", "cuda:7"] if not torch.cuda.is_available()
     else ["{source}", "--calib", "{calib}", "--out", "{out}", "--device", "bogus"], "--device"),
    (["{source}", "--calib", "{calib}", "--out", "{source}"], "is the source model"),
    (["{source}", "--calib", "{calib}", "--out", "{taken}"], "already exists; choose another folder"),
])
def test_bad_input_gives_one_line_and_nonzero_exit(tiny, tmp_path, args, message):
    source, calib = tiny
    taken = tmp_path / "taken"  # a non-empty folder the run does not read
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    filled = [a.format(source=source, calib=calib, out=tmp_path / "out", taken=taken) for a in args]
    result = run_cli(*filled)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no work folder beside --out
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]


def test_failure_midway_leaves_nothing_that_looks_like_a_bundle(tiny, tmp_path):
    source, calib = tiny
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    key = "model.layers.1.mlp.down_proj.weight"
    shard = broken / index["weight_map"][key]
    tensors = load_file(shard)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    # 16 samples: 4 of these short records (77 tokens) fall below the calibration minimum of 256 tokens
    result = run_cli(broken, "--calib", calib, "--out", tmp_path / "out", "--rank", "4", "--num-samples", "16")
    assert result.returncode != 0
    assert "non-finite" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_help_lists_the_options():
    result = run_cli("convert", "--help")
    assert result.returncode == 0
    for option in ("--bits", "--rank", "--calib", "--num-samples", "--seq-len", "--lora-alpha", "--use-rslora",
                   "--solver", "--als-steps", "--rounding", "--refine", "--gptq-damp", "--target-modules", "--device",
                   "--seed"):
        assert option in result.stdout


def test_module_entry_point_runs_the_same_app():
    result = subprocess.run([sys.executable, "-m", "quailora_cli", "convert", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--rank" in result.stdout and "--calib" in result.stdout


def test_option_defaults_are_the_settings_defaults():
    import typer

    command = typer.main.get_command(app).commands["convert"]
    options = {param.name: param.default for param in command.params}
    settings = {f.name: f.default for f in fields(ConvertSettings) if f.default is not MISSING}
    shared = set(options) & set(settings)
    assert shared == set(settings) - {"damp"}  # the library-only setting
    assert {name: options[name] for name in shared} == {name: settings[name] for name in shared}


def test_the_command_line_starts_without_torch():
    """--help, inspect and push-to-hub stay instant: torch and transformers load only when a command needs them."""
    code = "import sys, quailora_cli.main; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
