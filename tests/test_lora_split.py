"""--lora-split: the same correction M split into lora_B @ lora_A in different ways, M unchanged."""
import json

import pytest
import torch

from bundles import make_bundle
from quailora_convert.bundle.layout import REPORT
from quailora_convert.core.lora import KAIMING_ROW_NORM, lora_scaling, to_peft
from quailora_convert.core.options import LORA_SPLITS
from quailora_convert.core.solvers import solve_exact
from reference import adapter_tensors, assert_bundle_matches_reference, bundle_tensors

SHAPES = [(48, 80, 8), (96, 32, 4), (24, 24, 24)]  # (out, in, r): wide, tall, full rank


def correction(out: int, inp: int, rank: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    E = torch.randn(out, inp, generator=generator)
    X = torch.randn(inp, 4 * inp, generator=generator) * torch.linspace(0.1, 3, inp)[:, None]
    return solve_exact(E, X @ X.T / X.shape[1], rank)


@pytest.mark.parametrize("split", LORA_SPLITS)
@pytest.mark.parametrize("out,inp,rank", SHAPES)
@pytest.mark.parametrize("scaling", [0.25, 2.0])
def test_every_split_keeps_the_product(split, out, inp, rank, scaling):
    low_rank = correction(out, inp, rank, seed=out + inp)
    lora_A, lora_B = to_peft(low_rank, scaling, split)
    assert lora_A.shape == (rank, inp) and lora_B.shape == (out, rank)
    assert lora_A.dtype == lora_B.dtype == torch.float32
    M = low_rank.matrix()
    product = scaling * lora_B.double() @ lora_A.double()
    assert float((product - M).norm() / M.norm()) < 1e-6  # float32 storage of the factors, nothing more


@pytest.mark.parametrize("out,inp,rank", SHAPES)
def test_split_norms_are_as_specified(out, inp, rank):
    low_rank = correction(out, inp, rank, seed=7 * out + inp)
    S = torch.linalg.svdvals(low_rank.matrix())[:rank]
    scaling = lora_scaling(16.0, rank)
    for split, row_norm in (("a-kaiming", KAIMING_ROW_NORM), ("u", 1.0)):
        lora_A, lora_B = to_peft(low_rank, scaling, split)
        rows = lora_A.double().norm(dim=1)
        assert torch.allclose(rows, torch.full_like(rows, row_norm), rtol=1e-5), split
        gram = lora_A.double() @ lora_A.double().T  # orthogonal rows
        assert torch.allclose(gram, row_norm ** 2 * torch.eye(rank, dtype=torch.float64), atol=1e-5), split
        columns = lora_B.double().norm(dim=0)  # B = U S / (row_norm * scaling): column norms the singular values
        assert torch.allclose(columns, S / (row_norm * scaling), rtol=1e-5), split
    lora_A, lora_B = to_peft(low_rank, scaling, "balanced")  # both factors sqrt(S / scaling)
    assert torch.allclose(lora_A.double().norm(dim=1), (S / scaling).sqrt(), rtol=1e-5)
    assert torch.allclose(lora_B.double().norm(dim=0), (S / scaling).sqrt(), rtol=1e-5)


def test_kaiming_row_norm_is_peft_default():
    """The row norm a-kaiming copies: PEFT's default lora_A (kaiming_uniform_, a = sqrt(5)) at SmolLM2's widths."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(576, 1536), torch.nn.Linear(1536, 576)),
                           LoraConfig(r=64, lora_alpha=16, target_modules=["0", "1"]))
    for name, param in model.named_parameters():
        if "lora_A" in name:
            rows = param.detach().double().norm(dim=1)
            assert abs(float(rows.mean()) - KAIMING_ROW_NORM) < 0.01 * KAIMING_ROW_NORM, name


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="unknown LoRA split"):
        to_peft(correction(8, 8, 2, seed=0), 1.0, "nope")


def test_every_split_bundle_computes_the_same_q_plus_m(tmp_path):
    """A tiny conversion with each split: the same base bytes, factors that differ, and logits equal to the
    float32 reference Q + M within float32 tolerance (hence to the default's)."""
    bundles = {split: make_bundle(tmp_path / split, lora_split=split) for split in LORA_SPLITS}
    source, default = bundles["balanced"]
    ids = torch.randint(4, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    default_base, default_adapter = bundle_tensors(default), adapter_tensors(default)
    for split, (source, bundle) in bundles.items():
        assert_bundle_matches_reference(source, bundle, ids)
        base = bundle_tensors(bundle)
        assert all(torch.equal(base[k], default_base[k]) for k in default_base), split  # M alone changes split
        adapter = adapter_tensors(bundle)
        for key in (k for k in adapter if k.endswith("lora_A.weight")):
            other = key.replace("lora_A", "lora_B")
            product = adapter[other].double() @ adapter[key].double()
            want = default_adapter[other].double() @ default_adapter[key].double()
            assert float((product - want).norm() / want.norm()) < 1e-5, (split, key)
            if split != "balanced":
                assert not torch.allclose(adapter[key], default_adapter[key]), (split, key)
    for split, (_, bundle) in bundles.items():  # the report names the split (its settings are ConvertSettings')
        assert json.loads((bundle / REPORT).read_text())["settings"]["lora_split"] == split


def test_cli_passes_the_split_and_refuses_an_unknown_one(tmp_path):
    from cli_process import run_cli
    from tiny_models import save_tiny, tiny_llama_config, write_text_calibration

    source = save_tiny(tiny_llama_config(), tmp_path / "source")
    calib = write_text_calibration(tmp_path / "calib.jsonl")
    common = ("--calib", calib, "--rank", "4", "--num-samples", "8", "--seq-len", "32")
    result = run_cli(source, *common, "--out", tmp_path / "b", "--lora-split", "u")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "b" / REPORT).read_text())["settings"]["lora_split"] == "u"
    refused = run_cli(source, *common, "--out", tmp_path / "c", "--lora-split", "even")
    assert refused.returncode != 0 and "--lora-split 'even': choose one of balanced, a-kaiming, u" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "c").exists()
