"""--scales calibrated: NF4 block scales searched under H, never a larger calibrated error than bitsandbytes'
absmax, stored so that bitsandbytes' own dequantize_4bit and plain transformers read exactly the Q evaluated."""
import json

import bitsandbytes.functional as bnbF
import pytest
import torch

from quailora_convert.convert import ConvertSettings
from quailora_convert.core.quantize import NF4Quantizer
from quailora_convert.core.scales import calibrated_scales, searched_absmax
from quailora_convert.core.solvers import calibrated_error
from quailora_convert.errors import BadInputError
from bundles import make_bundle
from reference import adapter_tensors, assert_bundle_matches_reference, bundle_tensors, dequantize_saved


def random_spd(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, n) a random second moment: correlated inputs of uneven size, plus a few dead ones."""
    X = torch.randn(4 * n, n, generator=generator) @ torch.randn(n, n, generator=generator) / n ** 0.5
    X = X * torch.rand(n, generator=generator) * 3
    X[:, :2] = 0  # inputs the calibration never excited
    return X.T @ X / X.shape[0]


def weight_with_outliers(out: int, inn: int, generator: torch.Generator, outliers: int = 6) -> torch.Tensor:
    W = torch.randn(out, inn, generator=generator) * 0.02
    columns = torch.randperm(inn, generator=generator)[:outliers]
    W[:, columns] *= 10  # outlier input columns: their blocks' absmax wastes the other weights' levels
    return W


def stored_dequantized(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """What bitsandbytes itself reads back from a module's stored tensors."""
    state = bnbF.QuantState.from_dict({k[len("weight."):]: v for k, v in tensors.items() if k != "weight"},
                                      device=torch.device("cpu"))
    return bnbF.dequantize_4bit(tensors["weight"], state)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(96, 256), (40, 100)], ids=["rows-own-blocks", "blocks-span-rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_calibrated_scales_never_worse_than_absmax_and_better_with_outliers(seed, shape, dtype):
    generator = torch.Generator().manual_seed(seed)
    W = weight_with_outliers(*shape, generator).to(dtype)
    H = random_spd(shape[1], generator)
    quantizer = NF4Quantizer()
    nearest = calibrated_error(W.float() - quantizer.quantize(W).dequantized.float(), H)
    quantized, choice = calibrated_scales(W, H, quantizer)
    Q = stored_dequantized(quantized.tensors)  # (out, in) as bitsandbytes decodes the bytes
    assert torch.equal(Q, quantized.dequantized)  # the objective was computed on exactly what is stored
    error = calibrated_error(W.float() - Q.float(), H)
    assert error == pytest.approx(choice.error, rel=1e-12) and choice.error_absmax == pytest.approx(nearest, rel=1e-12)
    assert error < 0.95 * nearest  # outliers: clipping pays (measured 0.81-0.94 of it on these cases)
    assert choice.scales == "calibrated" and choice.rows_calibrated > 0


@pytest.mark.parametrize("shape", [(8, 128), (7, 100)])
def test_search_runs_in_chunks_along_bitsandbytes_blocks(shape):
    generator = torch.Generator().manual_seed(1)
    W = weight_with_outliers(*shape, generator)
    d = torch.diagonal(random_spd(shape[1], generator))
    levels = bnbF.get_4bit_type("nf4", device=torch.device("cpu")).float()
    flat = torch.cat([W.reshape(-1), W.new_zeros(-W.numel() % 64)])  # bnb's blocks of 64, the last padded
    absmax = flat.view(-1, 64).abs().amax(dim=1)
    assert torch.equal(searched_absmax(W, d, levels, (1.0,)), absmax)
    whole = searched_absmax(W, d, levels)
    assert torch.equal(searched_absmax(W, d, levels, chunk=3), whole)
    assert bool((whole <= absmax).all()) and bool((whole < absmax).any())


def test_falls_back_to_bitsandbytes_bytes_when_the_search_cannot_pay():
    generator = torch.Generator().manual_seed(0)
    W = (torch.randint(0, 2, (16, 128), generator=generator) * 2 - 1).float() * 0.05  # +-a: absmax is exact
    H = random_spd(128, generator)
    own = NF4Quantizer().quantize(W)
    quantized, choice = calibrated_scales(W, H, NF4Quantizer())
    assert choice.scales == "absmax" and choice.rows_calibrated == 0 and choice.error == choice.error_absmax
    assert all(torch.equal(quantized.tensors[k], own.tensors[k]) for k in own.tensors)


def test_scales_need_nf4():
    with pytest.raises(BadInputError, match="--bits 4"):
        ConvertSettings(model="m", out="o", calib="c", bits=8, scales="calibrated").validate()
    with pytest.raises(BadInputError, match="--scales"):
        ConvertSettings(model="m", out="o", calib="c", scales="mse").validate()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    made = {}
    for name, settings in {"default": {}, "absmax": dict(scales="absmax"), "calibrated": dict(scales="calibrated"),
                           "calibrated-gptq": dict(scales="calibrated", rounding="gptq", refine=1)}.items():
        made[name] = make_bundle(tmp_path_factory.mktemp(name), **settings)
    return made


@pytest.mark.parametrize("name", ["calibrated", "calibrated-gptq"])
def test_calibrated_bundle_loads_and_computes_q_plus_m(bundles, name):
    source, bundle = bundles[name]
    assert_bundle_matches_reference(source, bundle, torch.randint(4, 500, (2, 24)))
    report = json.loads((bundle / "quailora_report.json").read_text())
    assert report["settings"]["scales"] == "calibrated"
    modules = report["modules"]
    assert sum(m["calibrated_scale_rows"] > 0 for m in modules) >= len(modules) // 2
    for m in modules:
        if name == "calibrated":  # round-to-nearest on the chosen scales: never worse than on bnb's absmax
            assert m["error_before"] <= m["error_nearest"]
        assert m["error_after"] <= m["error_before"]


def test_calibrated_bundle_stores_other_scales_than_absmax(bundles):
    calibrated, plain = bundle_tensors(bundles["calibrated"][1]), bundle_tensors(bundles["default"][1])
    assert calibrated.keys() == plain.keys()
    assert any(not torch.equal(calibrated[k], plain[k]) for k in plain if k.endswith(".weight.absmax"))
    module = "model.layers.0.mlp.down_proj"
    assert dequantize_saved(calibrated, module).shape == dequantize_saved(plain, module).shape


def test_absmax_is_todays_bytes(bundles):
    default, absmax = bundles["default"][1], bundles["absmax"][1]
    for read in (bundle_tensors, adapter_tensors):
        want, got = read(default), read(absmax)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_card_and_eval_name_calibrated_scales(bundles):
    from quailora_convert.evaluate import ROW_BASE, ROW_PLAIN, _loaders

    card = (bundles["calibrated"][1] / "README.md").read_text()
    assert "NF4 block scales searched per block under the calibration `H`" in card
    assert "searched per block" not in (bundles["default"][1] / "README.md").read_text()
    report = json.loads((bundles["calibrated"][1] / "quailora_report.json").read_text())
    rows = [name for name, _, _ in _loaders(bundles["calibrated"][1], report, None, torch.float32)]
    assert ROW_PLAIN not in rows and ROW_BASE in rows  # its base is not bitsandbytes' own quantization
