"""benchmarks/speed.py end to end on a tiny model: the conversion, the bare forward passes and the floor."""
import json
import subprocess
import sys
from pathlib import Path

from tiny_models import save_tiny, tiny_llama_config, write_text_calibration

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
INPUT_GROUPS_PER_LAYER = 4  # q/k/v, o, gate/up, down


def test_speed_reports_ratios_to_the_forward_and_to_a_floor_that_saw_every_token(tmp_path):
    layers = 2
    source = save_tiny(tiny_llama_config(num_hidden_layers=layers), tmp_path / "source")
    calib = write_text_calibration(tmp_path / "calib.jsonl", count=24)
    out = tmp_path / "speed.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(source), "--calib", str(calib), "--num-samples", "8",
         "--seq-len", "32", "--batch-size", "4", "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(out.read_text())
    forward = measured["forwards"][0]
    # the floor ran over the conversion's batches (longest first, not the drawn order's) and summed H over every
    # real token, once per input group of every layer
    assert forward["floor_positions"] == forward["padded_tokens"] < forward["drawn_order_padded_tokens"]
    assert forward["floor_group_tokens"] == forward["tokens"] * INPUT_GROUPS_PER_LAYER * layers
    assert 0 < forward["floor_hessian_seconds"] < forward["floor_seconds"]
    (conversion,) = measured["conversions"]
    assert conversion["rounds"][0]["tokens"] == forward["tokens"]  # the conversion calibrated on the same tokens
    assert conversion["ratio"] == conversion["wall_seconds"] / measured["decoder_seconds"]
    assert conversion["ratio_to_floor"] == conversion["wall_seconds"] / measured["floor_seconds"]
    assert "ratio to floor" in result.stdout
