"""benchmarks/bf16_updates.py: which entries a bfloat16 weight cannot move by an update of a given size."""
import json
import runpy
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bf16_updates.py"


@pytest.fixture(scope="module")
def bench() -> dict:
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(SCRIPT.parent))
        return runpy.run_path(str(SCRIPT))


def test_an_update_is_lost_exactly_where_it_is_below_half_an_ulp(bench):
    share = bench["lost_update_share"]
    assert share(torch.tensor([1.0]), 2e-4) == 1.0  # ulp(1) = 2^-7 in bfloat16
    assert share(torch.tensor([0.01]), 2e-4) == 0.0  # ulp(0.01) = 2^-14
    assert share(torch.zeros(3), 2e-4) == 0.0
    w = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 0.1
    exponent = torch.floor(torch.log2(w.to(torch.bfloat16).float().abs()))
    for u in (2e-4, 1e-4, 2e-5):
        below_half_ulp = (u < 2.0 ** (exponent - 8)).float().mean()  # half an ulp below |w| (8 significant bits)
        assert abs(share(w, u) - float(below_half_ulp)) < 0.01
    shares = [share(w, u) for u in (2e-5, 1e-4, 2e-4, 1e-3)]
    assert shares == sorted(shares, reverse=True) and shares[0] > shares[-1]  # larger updates are lost less
    assert share(w * 4, 2e-4) > share(w, 2e-4)  # larger factors lose more


def test_the_script_measures_each_init_as_finetune_loads_it(bench, tmp_path):
    from bundles import make_bundle

    source, bundle = make_bundle(tmp_path)
    out = tmp_path / "shares.json"
    assert bench["main"](["--source", str(source), "--plain", f"plain={bundle}", "--bundle", f"q={bundle}",
                          "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"plain", "q"}
    for row in rows.values():
        assert all(0.0 <= row[f"{u:g}"] <= 1.0 for u in (2e-4, 1e-4, 2e-5)) and row["max_entry"] > 0
        assert row["2e-05"] >= row["0.0001"] >= row["0.0002"]
