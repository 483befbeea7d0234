"""benchmarks/finetune.py end to end on a tiny model: every init trains with plain PEFT + Trainer, curves are written."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from quailora_convert.convert import ConvertSettings, convert
from tiny_models import VOCAB, save_tiny, tiny_llama_config, write_text_calibration

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "finetune.py"


def write_alpaca(path: Path, count: int) -> Path:
    rng = random.Random(1)
    words = [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(VOCAB - 4)]
    records = [{"instruction": " ".join(rng.choice(words) for _ in range(6)), "input": "",
                "output": " ".join(rng.choice(words[:40]) for _ in range(rng.randint(5, 20)))} for _ in range(count)]
    path.write_text(json.dumps(records))
    return path


def test_finetune_runs_every_init_and_writes_curves(tmp_path):
    source = save_tiny(tiny_llama_config(), tmp_path / "source")
    calib = write_text_calibration(tmp_path / "calib.jsonl")
    bundle = convert(ConvertSettings(model=str(source), out=tmp_path / "bundle", calib=str(calib), rank=8,
                                     num_samples=16, seq_len=32, batch_size=4))
    data = write_alpaca(tmp_path / "alpaca.json", 48)
    out = tmp_path / "ft"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--source", str(source), "--bundle", f"quailora={bundle}",
         "--plain", f"qlora={bundle}", "--int8", "--data", str(data), "--eval-records", "8", "--steps", "5",
         "--micro-batch", "8", "--max-len", "64", "--out", str(out)],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "finetune.json").read_text())
    assert list(results["runs"]) == ["quailora", "qlora", "int8 QLoRA"]
    for label, run in results["runs"].items():
        assert [p["step"] for p in run["curve"]] == [0, 1, 2, 3, 4, 5], label
        assert len(run["losses"]) == 5 and all(l["loss"] == l["loss"] for l in run["losses"]), label
        assert run["curve"][-1]["ppl"] < run["curve"][0]["ppl"], label  # training lowers held-out perplexity
    quailora, plain = results["runs"]["quailora"]["curve"][0], results["runs"]["qlora"]["curve"][0]
    assert quailora["ppl"] != pytest.approx(plain["ppl"], rel=1e-4)  # different inits on the same base
    assert results["data"]["train_records"] == 40 and results["data"]["eval_records"] == 8
    assert (out / "finetune.png").stat().st_size > 10_000
    assert "| init |" in result.stdout
