"""benchmarks/first_step.py: the first Adam step on W that each init makes, per unit lr, against a real AdamW step;
and the script on a tiny bundle (PEFT's default init moves W only through dB A)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bundles import make_bundle
from test_finetune_benchmark import alpaca_records

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def first_step():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))  # as when run as a script: its siblings finetune.py, workplace.py
        import first_step as module
    return module


@pytest.mark.parametrize("seed", range(6))
def test_first_step_matches_a_real_adamw_step(first_step, seed):
    """||s (B'A' - BA)|| / lr after one torch.optim.AdamW step of a small lr is the predicted first-order step."""
    gen = torch.Generator().manual_seed(seed)
    out_features, in_features, rank, scaling = 24, 40, 4, [0.25, 2.0, 16.0][seed % 3]
    A = torch.randn(rank, in_features, generator=gen, dtype=torch.float64, requires_grad=True)
    B = (torch.randn(out_features, rank, generator=gen, dtype=torch.float64) * (seed % 2)).requires_grad_()  # B = 0 too
    G = torch.randn(out_features, in_features, generator=gen, dtype=torch.float64)
    start = (scaling * B @ A).detach()
    (G * (scaling * B @ A)).sum().backward()  # a loss linear in W
    predicted = first_step.adam_first_step(A.detach(), B.detach(), A.grad, B.grad, scaling)
    lr = 1e-7
    torch.optim.AdamW([A, B], lr=lr, weight_decay=0.0, eps=first_step.ADAM_EPS).step()
    moved = float((scaling * B.detach() @ A.detach() - start).norm()) / lr
    assert moved == pytest.approx(predicted["step"] ** 0.5, rel=1e-4)
    decrease = -float((G * (scaling * B.detach() @ A.detach() - start)).sum()) / lr  # first order in lr
    assert decrease == pytest.approx(predicted["decrease"], rel=1e-4)
    if seed % 2 == 0:  # B = 0: A's gradient is 0, so only dB A moves W
        assert predicted["step_B_dA"] == 0.0 and predicted["step"] == pytest.approx(predicted["step_dB_A"])


def test_script_on_a_tiny_bundle(tmp_path):
    source, bundle = make_bundle(tmp_path)
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(alpaca_records(40, seed=1)))
    out = tmp_path / "first_step.json"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "first_step.py"), "--source", str(source),
                             "--plain", f"plain={bundle}", "--bundle", f"quailora={bundle}", "--int8",
                             "--data", str(data), "--eval-records", "8", "--max-len", "48", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows["plain"]["step_per_lr_vs_plain"] == 1.0 and rows["plain"]["B_dA_per_lr"] == 0.0
    assert rows["plain"]["init_norms"]["B"] == 0.0 and rows["int8"]["B_dA_per_lr"] == 0.0
    assert rows["quailora"]["B_dA_per_lr"] > 0 and rows["quailora"]["init_norms"]["scaled_BA"] > 0
    assert all(r["step_per_lr"] > 0 and r["loss_decrease_per_lr"] > 0 for r in rows.values())
    assert "| quailora |" in result.stdout
