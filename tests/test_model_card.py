"""The README.md model card: rendered from model_cards/ into every bundle, valid offline, re-renderable."""
import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from bundles import make_bundle
from quailora_convert.bundle.layout import INIT_ADAPTER_CONFIG, INIT_ADAPTER_DIR
from quailora_convert.errors import BadInputError
from quailora_convert.model_card import build_model_card, card_problems, render_model_card, template_text

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("card"), bits=8, solver="als", als_steps=3, use_rslora=True)


def read_card(bundle):
    text = (bundle / "README.md").read_text()
    return text, ModelCard(text)


def test_convert_writes_a_valid_card_with_inherited_licence_and_language(converted):
    _, bundle = converted
    text, card = read_card(bundle)
    assert card_problems(text) == []
    data = card.data.to_dict()
    assert data["library_name"] == "peft" and data["pipeline_tag"] == "text-generation"
    assert data["license"] == "apache-2.0" and data["language"] == ["en", "fr"]  # from the source's README.md
    assert set(data["tags"]) >= {"bitsandbytes", "int8", "qlora", "peft", "quailora"} and "nf4" not in data["tags"]
    assert "base_model" not in data and "base_model_relation" not in data  # a local source has no Hub id
    assert 'AutoModelForCausalLM.from_pretrained("' in text and 'subfolder="quailora_init", is_trainable=True' in text
    assert "SFTTrainer" in text and "8-bit LLM.int8" in text and "rsLoRA" in text and "3 steps" in text


def test_card_reports_the_measured_errors_per_layer(converted):
    _, bundle = converted
    text, _ = read_card(bundle)
    report = json.loads((bundle / "quailora_report.json").read_text())
    reduction = 1 - report["summary"]["relative_error_after"]
    assert f"**Overall calibrated error reduction: {reduction:.1%} lower than plain quantization.**" in text
    for layer in (0, 1):
        group = [m for m in report["modules"] if f".layers.{layer}." in m["module"]]
        before, after = sum(m["error_before"] for m in group), sum(m["error_after"] for m in group)
        assert f"| {layer} | 7 | {before:.4g} | {after:.4g} | {1 - after / before:.1%} |" in text
    for version in report["versions"].values():
        assert version in text
    assert "No evaluation was run" in text


def test_the_weight_space_baseline_is_opt_in_and_leaves_the_bundle_bytes_alone(converted, tmp_path):
    _, bundle = converted
    text, _ = read_card(bundle)
    report = json.loads((bundle / "quailora_report.json").read_text())
    assert all(m["error_svd_init"] is None for m in report["modules"]) and "| SVD of `E` (weight-space" not in text
    _, with_baseline = make_bundle(tmp_path, bits=8, solver="als", als_steps=3, use_rslora=True, report_baseline=True)
    text, _ = read_card(with_baseline)
    modules = json.loads((with_baseline / "quailora_report.json").read_text())["modules"]
    for m in modules:  # the rank-r SVD of E: between no adapter and the activation-aware solve
        assert m["error_after"] <= m["error_svd_init"] <= m["error_before"], m["module"]
    assert f"| SVD of `E` (weight-space, LoftQ-like) | {sum(m['error_svd_init'] for m in modules):.4g} |" in text
    shards = sorted(p.name for p in bundle.glob("*.safetensors"))
    assert shards == sorted(p.name for p in with_baseline.glob("*.safetensors")) and shards
    for name in shards:
        assert (bundle / name).read_bytes() == (with_baseline / name).read_bytes(), name


def test_rerender_with_eval_and_hub_source(converted, tmp_path):
    _, bundle = converted
    copy = tmp_path / "bundle"
    (copy / INIT_ADAPTER_DIR).mkdir(parents=True)
    for name in ("quailora_report.json", INIT_ADAPTER_CONFIG):
        (copy / name).write_text((bundle / name).read_text())
    (copy / "quailora_eval.json").write_text(json.dumps({
        "rows": [{"model": "source (bf16)", "perplexity": 10.0}, {"model": "plain QLoRA", "perplexity": 12.5},
                 {"model": "this bundle", "perplexity": 10.75}], "gap_closed": 0.7, "data": "held-out text"}))
    card = render_model_card(copy, base_model="org/tiny-source", model_id="alice/tiny")
    text = (copy / "README.md").read_text()
    assert str(card) == text and card_problems(text) == []
    assert card.data.base_model == "org/tiny-source" and card.data.to_dict()["base_model_relation"] == "quantized"
    assert "| plain QLoRA | 12.500 |" in text and "| this bundle | 10.750 |" in text and "**70.0%**" in text
    assert "On held-out text" in text and "No evaluation" not in text
    assert 'from_pretrained("alice/tiny", dtype=torch.float32)' in text
    assert f'"alice/tiny", subfolder="{INIT_ADAPTER_DIR}"' in text  # the adapter from its folder
    assert card.data.license == "apache-2.0"  # the report names the local source folder, whose README.md is read

    (copy / "quailora_eval.json").write_text(json.dumps({"rows": [{"model": "x"}]}))
    with pytest.raises(BadInputError, match="rows"):
        render_model_card(copy)


def test_hub_source_sets_base_model_from_the_report(converted):
    _, bundle = converted
    report = json.loads((bundle / "quailora_report.json").read_text())
    report["source"] = {"model": "org/model", "repo_id": "org/model", "commit": "a" * 40}
    card = build_model_card(report, model_id="x/y")
    assert card.data.base_model == "org/model" and card.data.to_dict()["base_model_relation"] == "quantized"
    assert "@ `aaaaaaaaaaaa`" in str(card) and "[org/model](https://huggingface.co/org/model)" in str(card)


@pytest.mark.parametrize("text,problem", [
    ("# no metadata\n", "no YAML metadata"),
    ("---\nlibrary_name: peft\npipeline_tag: text-generation\ntags: [a]\nbase_model_relation: quantized\n---\n", "needs base_model"),
    ("---\nlibrary_name: peft\npipeline_tag: text-generation\ntags: a\n---\n", "list of strings"),
    ("---\npipeline_tag: text-generation\ntags: [a]\n---\n", "missing library_name"),
    ("---\nlibrary_name: peft\npipeline_tag: text-generation\ntags: [a]\nbase_model: local-folder\n---\n", "not a Hub repo id"),
    ("---\nlibrary_name: [peft\n---\n", "does not parse"),
])
def test_card_validation_catches_bad_metadata(text, problem):
    assert any(problem in p for p in card_problems(text)), card_problems(text)


def test_template_is_the_top_level_model_cards_file():
    assert template_text() == (REPO_ROOT / "model_cards" / "quailora_bundle.md").read_text()
