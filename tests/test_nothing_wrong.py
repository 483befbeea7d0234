"""Issue 22: a bundle that cannot work is never written (compute dtype vs the values it computes), and the small
things a user reads: which option a message names, which line of a file, plurals, warnings on stderr."""
import ast
import json
import logging
import re
from pathlib import Path

import pytest
import torch

from bundles import make_bundle
from cli_process import run_cli
from quailora_convert.convert.compute_dtype import BundleValues, choose_compute_dtype
from quailora_convert.errors import BadInputError
from quailora_convert.core.value_range import Largest, holding_dtype, holds
from tiny_models import save_tiny, save_tiny_half_config, tiny_llama_config, write_text_calibration

REPO = Path(__file__).resolve().parents[1]
HALF_MAX = torch.finfo(torch.float16).max  # 65504


# -- the range facts ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_holds_is_finiteness_after_rounding(dtype):
    values = torch.logspace(-3, 39, 400, dtype=torch.float64)
    values = torch.cat([values, torch.tensor([HALF_MAX, 65519.0, 65520.0, 3.39e38, 3.4e38])])
    for value in values.tolist():
        assert holds(dtype, value) == bool(torch.isfinite(torch.tensor(value, dtype=torch.float64).to(dtype)))
        assert holds(dtype, -value) == holds(dtype, value)
    assert holds(torch.float16, HALF_MAX) and holds(torch.float16, 65519.0) and not holds(torch.float16, 65520.0)


def test_holding_dtype_and_choice_name_the_tensor(caplog):
    big = Largest("model.layers.0.mlp.down_proj.weight", 1e6)
    assert holding_dtype([torch.float16, torch.bfloat16], big) == torch.bfloat16
    assert holding_dtype([torch.float16], None) == torch.float16
    small = [Largest("model.norm.weight", 3.0), Largest("the calibration inputs of q_proj", 6e4, activation=True)]
    with caplog.at_level(logging.WARNING):
        kept = choose_compute_dtype(torch.float16, {torch.float32}, BundleValues(small, {torch.float16}))
    assert kept.dtype == torch.float16 and not kept.changed and not caplog.records
    with caplog.at_level(logging.WARNING):
        chosen = choose_compute_dtype(torch.float16, {torch.float32}, BundleValues(small + [big], {torch.float32}))
    assert chosen.dtype == torch.float32 and chosen.changed and chosen.largest == big
    assert len(caplog.records) == 1 and big.what in caplog.text and "float16" in caplog.text
    assert choose_compute_dtype(torch.float16, {torch.float16}, BundleValues([big])).dtype == torch.bfloat16
    assert choose_compute_dtype(torch.bfloat16, {torch.bfloat16}, BundleValues([big])).dtype == torch.bfloat16


def test_activations_the_kept_tensors_cannot_hold_are_refused():
    """No compute dtype helps when the residual stream (the kept tensors' dtype) overflows."""
    hot = Largest("the calibration inputs of model.layers.0.self_attn.q_proj", 2.4e5, activation=True)
    with pytest.raises(BadInputError, match=r"^the calibration inputs of model\.layers\.0\.self_attn\.q_proj reach "
                                            r"2\.4e\+05, past the largest float16 value"):
        choose_compute_dtype(torch.float16, {torch.float16}, BundleValues([hot], {torch.float16, torch.float32}))
    assert choose_compute_dtype(torch.float16, {torch.float16}, BundleValues([hot], {torch.bfloat16})).dtype == \
        torch.bfloat16


# -- a float16 config over values float16 cannot hold: the bundle still works ------------------------------
def _half_config_source(root: Path, stored: torch.dtype, edit) -> Path:
    return save_tiny_half_config(root / "source", stored, edit)


def _set(key: str, index, value: float):
    def edit(weights):
        weights[key][index] = value
    return edit


def _logits_of_bundle(bundle: Path, dtype) -> torch.Tensor:
    """The bundle as plain transformers loads it, in train mode under no_grad (how it fine-tunes)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bundle, dtype=dtype)
    model.train()
    with torch.no_grad():
        return model(input_ids=torch.tensor([[2, 10, 50, 300, 7, 9, 11, 400]])).logits


CASES = {  # name -> (stored dtype, edit, the tensor the warning names, the dtype the bundle computes in)
    "linear_weight": (torch.float32, _set("model.layers.0.mlp.down_proj.weight", (0, 0), 1e6),
                      "model.layers.0.mlp.down_proj.weight", "float32"),
    "embedding": (torch.float32, _set("model.embed_tokens.weight", (10, 0), 1e6), "model.embed_tokens.weight",
                  "float32"),
    "bfloat16_weights": (torch.bfloat16, _set("model.layers.1.self_attn.o_proj.weight", (3, 5), 1e6),
                         "model.layers.1.self_attn.o_proj.weight", "bfloat16"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_half_config_over_values_it_cannot_hold_gives_a_working_bundle(tmp_path, case):
    stored, edit, named, chosen = CASES[case]
    source = _half_config_source(tmp_path, stored, edit)
    calib = write_text_calibration(tmp_path / "calib.jsonl")
    out = tmp_path / "bundle"
    result = run_cli(source, "--calib", calib, "--out", out, "--rank", 8, "--num-samples", 8, "--seq-len", 32)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "past the largest float16 value" in line]
    assert len(warnings) == 1 and named in warnings[0] and f"computes in {chosen}" in warnings[0], result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_compute_dtype"] == chosen and config["dtype"] == chosen
    for dtype in (torch.float32, "auto"):  # the README's float32 and the config's own dtype
        logits = _logits_of_bundle(out, dtype)
        assert bool(torch.isfinite(logits).all()), (dtype, logits.abs().max())


def test_activations_past_the_stored_dtype_are_refused_with_nothing_written(tmp_path):
    """float16 weights, all in range; a norm scales layer 0's attention inputs past float16's range: the
    source itself overflows in float16, and so would any bundle keeping its norms and embeddings in it."""
    source = _half_config_source(tmp_path, torch.float16,
                                 _set("model.layers.0.input_layernorm.weight", slice(None), 6e4))
    calib = write_text_calibration(tmp_path / "calib.jsonl")
    result = run_cli(source, "--calib", calib, "--out", tmp_path / "bundle", "--rank", 8, "--num-samples", 8,
                     "--seq-len", 32)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the calibration inputs of model.layers.0.self_attn.q_proj reach" in errors[0]
    assert "past the largest float16 value" in errors[0] and "Traceback" not in result.stderr
    assert "--overwrite" in errors[0] and "--resume" not in errors[0]  # a fixed source is another source
    assert not (tmp_path / "bundle").exists()


def test_a_float16_config_that_holds_its_values_is_kept(tmp_path):
    source = _half_config_source(tmp_path, torch.float16, lambda weights: None)
    calib = write_text_calibration(tmp_path / "calib.jsonl")
    result = run_cli(source, "--calib", calib, "--out", tmp_path / "b", "--rank", 8, "--num-samples", 8,
                     "--seq-len", 32)
    assert result.returncode == 0, result.stderr
    assert "past the largest" not in result.stderr
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_compute_dtype"] == "float16" and config["dtype"] == "float16"
    report = json.loads((tmp_path / "b" / "quailora_report.json").read_text())
    assert all(0 < m["weight_max_abs"] < HALF_MAX and 0 < m["input_max_abs"] < HALF_MAX for m in report["modules"])


# -- item 9: what the user reads ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def refined_bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("refined"), refine=1)[1]


def test_eval_with_a_missing_data_file_names_data_before_any_library_speaks(refined_bundle, tmp_path):
    result = run_cli("eval", refined_bundle, "--data", tmp_path / "missing.jsonl", cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr  # the error alone: no bitsandbytes kernel note before it
    assert lines[0].startswith("error: --data ") and "missing.jsonl" in lines[0] and "--calib" not in lines[0]
    assert result.stdout == ""


def test_a_bad_record_is_named_by_its_line_and_position(tmp_path):
    from quailora_convert.calibration.texts import read_texts
    from quailora_convert.errors import BadInputError

    good = [json.dumps({"text": f"record {i}"}) for i in range(5)]
    (tmp_path / "a.jsonl").write_text("\n".join(good[:2] + [""] + good[2:] + [json.dumps({"txt": "x"})]) + "\n")
    with pytest.raises(BadInputError, match=r"a\.jsonl line 7: expected Alpaca records"):  # 6 records, 1 blank line
        read_texts(str(tmp_path / "a.jsonl"))
    (tmp_path / "b.json").write_text(json.dumps([{"text": "ok"}] * 5 + [{"txt": "x"}]))
    with pytest.raises(BadInputError, match=r"b\.json record 6 of 6: expected"):
        read_texts(str(tmp_path / "b.json"))
    (tmp_path / "c.jsonl").write_text(good[0] + "\n" + '{"text": oops}\n')
    with pytest.raises(BadInputError, match=r"c\.jsonl line 2: invalid JSON \(Expecting value at col 10\)"):
        read_texts(str(tmp_path / "c.jsonl"))
    (tmp_path / "d.csv").write_text("text\n")
    with pytest.raises(BadInputError, match=r"^--data .*d\.csv: unsupported extension"):
        read_texts(str(tmp_path / "d.csv"), option="--data")


def test_one_refinement_round_is_singular(refined_bundle):
    result = run_cli("inspect", refined_bundle)
    assert result.returncode == 0, result.stderr
    assert "1 refinement round" in result.stdout and "1 refinement rounds" not in result.stdout
    card = (refined_bundle / "README.md").read_text()
    assert "1 rounds" not in card and "1 round of re-rounding" in card


def test_the_rank_warning_goes_to_stderr(tmp_path):
    source = save_tiny(tiny_llama_config(num_key_value_heads=1), tmp_path / "source")  # k/v_proj: 32 outputs
    calib = write_text_calibration(tmp_path / "calib.jsonl")
    for extra in ([], ["--dry-run"]):
        result = run_cli(source, "--calib", calib, "--out", tmp_path / "out", "--rank", 40, "--num-samples", 8,
                         "--seq-len", 32, *extra)
        assert result.returncode == 0, result.stderr
        assert "warning: --rank 40 exceeds the size of" in result.stderr
        assert "--rank 40" not in result.stdout, result.stdout


DOUBLED = re.compile(r"\b(at|the|a|an|to|of|in|is|on|for|and|or|be|it)\s+\1\b", re.IGNORECASE)


def _string_texts(path: Path):
    """Every string literal of a module, with implicitly joined pieces and f-string parts as Python joins them."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.JoinedStr):
            yield "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values), node.lineno
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value, node.lineno


def test_no_message_doubles_a_word():
    found = [f"{path.relative_to(REPO)}:{line}: {DOUBLED.search(text).group(0)!r}"
             for folder in ("quailora_convert", "cli", "model_cards") for path in sorted((REPO / folder).rglob("*"))
             if path.suffix in (".py", ".md")
             for text, line in (_string_texts(path) if path.suffix == ".py" else [(path.read_text(), 0)])
             if DOUBLED.search(text)]
    assert not found, found
