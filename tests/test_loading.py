"""The README's way to load a bundle: plain transformers attaches the adapter once and warns about nothing,
from the bundle's folder, from a moved copy (never reading the old folder), and from the Hub.

Why not PEFT's AutoPeftModelForCausalLM: it loads the base with transformers from the adapter config's
base_model_name_or_path (peft/auto.py), transformers finds adapter_config.json there and attaches the adapter
(transformers/models/auto/auto_factory.py, find_adapter_config_file), then PEFT attaches it again
(peft/tuners/tuners_utils.py warns "Already found a `peft_config`"). No layout avoids both: the adapter
config at the root is what PEFT reads and what transformers detects.
"""
import json
import logging
import shutil
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import constants
from peft.tuners.tuners_utils import BaseTuner
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from bundles import make_bundle
from paths import REPO as ROOT
from quailora_convert.publish import push_to_hub
from reference import reference_model, use_float32_compute

REPO = "alice/tiny-quailora"
IDS = torch.randint(4, 500, (2, 24), generator=torch.Generator().manual_seed(0))


def load_as_the_readme_says(where, **kwargs):
    """README.md "Use the bundle" (checked against its text below), with test-only keyword arguments."""
    model = AutoModelForCausalLM.from_pretrained(where, **{"dtype": torch.float32, **kwargs})
    model.set_adapter("default")
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("loading"))  # (source, bundle)


@contextmanager
def attachments():
    """Counts adapter injections (PEFT's and transformers' both go through BaseTuner.inject_adapter)."""
    counts = {"inject": 0}
    original = BaseTuner.inject_adapter

    def counting(self, *args, **kwargs):
        counts["inject"] += 1
        return original(self, *args, **kwargs)

    BaseTuner.inject_adapter = counting
    try:
        yield counts
    finally:
        BaseTuner.inject_adapter = original


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(f"{record.name}: {record.getMessage()}")


@contextmanager
def library_messages():
    """Every warning a user sees (warnings.warn) and WARNING+ log record (transformers' own tree included) within."""
    handler, found = _Records(), []
    loggers = [logging.getLogger(), logging.getLogger("transformers")]  # transformers' tree does not propagate
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_warning()  # conftest sets error
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for hidden in (DeprecationWarning, PendingDeprecationWarning):  # what Python shows a user's script
                warnings.simplefilter("ignore", hidden)
            yield found
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        transformers.utils.logging.set_verbosity(verbosity)
    found.extend([f"{w.category.__name__}: {w.message}" for w in caught] + handler.lines)


def assert_one_trainable_adapter(model, modules: int = 14):
    assert list(model.peft_config) == ["default"]
    lora_a = [n for n, _ in model.named_modules() if n.endswith(".lora_A.default")]
    assert len(lora_a) == modules
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * modules and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def logits(model) -> torch.Tensor:
    model.train()  # eval on AVX512-BF16 CPUs swaps in a bf16 kernel (and repacks the 4-bit weights)
    with torch.no_grad():
        return model(IDS).logits


def test_the_readme_and_the_model_card_load_this_way():
    readme = (ROOT / "README.md").read_text()
    card = (ROOT / "model_cards" / "quailora_bundle.md").read_text()
    assert 'model = AutoModelForCausalLM.from_pretrained("smollm2-quailora", dtype=torch.float32)' in readme
    assert 'model = AutoModelForCausalLM.from_pretrained("{{ model_id }}"' in card
    for text in (readme, card):
        assert 'model.set_adapter("default")' in text
        code = text.split("```python", 1)[1].split("```", 1)[0]
        assert "AutoPeftModel" not in code and "PeftModel.from_pretrained" not in code


def test_readme_load_attaches_the_adapter_once_without_a_warning(converted):
    _, bundle = converted
    with attachments() as counts, library_messages() as messages:
        model = load_as_the_readme_says(bundle)
    assert counts["inject"] == 1 and messages == []
    assert_one_trainable_adapter(model)

    with library_messages() as messages:  # a plain load: the same adapter, attached frozen
        plain = AutoModelForCausalLM.from_pretrained(bundle)
    assert messages == [] and list(plain.peft_config) == ["default"]
    assert not any(p.requires_grad for p in plain.parameters())


def test_readme_load_computes_q_plus_the_adapter(converted):
    source, bundle = converted
    model = load_as_the_readme_says(bundle, dtype=torch.float32)
    use_float32_compute(model)
    reference = reference_model(source, bundle)
    got, want = logits(model), logits(reference)
    # transformers keeps the LoRA factors in the 4-bit compute dtype (bf16 here; PEFT would upcast them)
    assert torch.allclose(got, want, atol=1e-3, rtol=1e-3), (got - want).abs().max()
    model.disable_adapters()
    assert not torch.allclose(logits(model), want, atol=1e-2)  # the adapter matters


def test_peft_wrappers_attach_the_adapter_twice(converted):
    """What the README steers away from (transformers 5.23 / peft 0.21.2): if this fails, PEFT changed."""
    from peft import AutoPeftModelForCausalLM

    _, bundle = converted
    with attachments() as counts, library_messages() as messages:
        AutoPeftModelForCausalLM.from_pretrained(bundle, is_trainable=True)
    assert counts["inject"] == 2 and any("Already found a `peft_config`" in m for m in messages)


@contextmanager
def python_opens_under(folder: Path):
    """Paths under folder that Python code opens within (the safetensors reader is Rust: see the garbage test)."""
    opened: list[str] = []
    prefix = str(folder.resolve())

    def hook(event, args):
        if watching and event == "open" and isinstance(args[0], (str, Path)) and str(args[0]).startswith(prefix):
            opened.append(str(args[0]))

    watching = True
    sys.addaudithook(hook)  # cannot be removed: switched off below
    try:
        yield opened
    finally:
        watching = False


def test_a_moved_bundle_loads_from_where_it_is_and_never_from_the_old_folder(tmp_path):
    _, original = make_bundle(tmp_path)
    want = logits(load_as_the_readme_says(original))
    moved = tmp_path / "elsewhere" / "moved"
    shutil.copytree(original, moved)
    adapter_config = json.loads((moved / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(original.resolve())  # where it was written

    # The old folder altered: other adapter numbers, and base shards and config that fail if read at all.
    adapter = load_file(original / "adapter_model.safetensors")
    save_file({k: 3 * v for k, v in adapter.items()}, original / "adapter_model.safetensors")
    for shard in original.glob("model*.safetensors"):
        shard.write_bytes(b"not a safetensors file")
    (original / "config.json").write_text("{ not json")
    with pytest.raises(OSError):  # what reading it gives
        load_as_the_readme_says(original)
    with python_opens_under(original) as opened, attachments() as counts, library_messages() as messages:
        model = load_as_the_readme_says(moved)
    assert opened == [] and counts["inject"] == 1 and messages == []
    assert_one_trainable_adapter(model)
    assert torch.equal(logits(model), want)

    shutil.rmtree(original)  # the old folder gone
    assert torch.equal(logits(load_as_the_readme_says(moved)), want)


@pytest.mark.parametrize("branch", ["main", "dev"])
def test_readme_load_from_the_hub_attaches_the_adapter_once(converted, hub, tmp_path, monkeypatch, branch):
    """The files the fake Hub received, laid out as the HF cache holds a download, loaded by repo id offline."""
    _, bundle = converted
    want = logits(load_as_the_readme_says(bundle))
    push_to_hub(bundle, REPO, revision=None if branch == "main" else branch)
    commit = hub.commits[-1]
    oid = "0123456789abcdef0123456789abcdef01234567"
    repo_cache = tmp_path / "cache" / f"models--{REPO.replace('/', '--')}"
    (repo_cache / "refs").mkdir(parents=True)
    (repo_cache / "refs" / branch).write_text(oid)
    for name, data in commit.files.items():
        (repo_cache / "snapshots" / oid / name).parent.mkdir(parents=True, exist_ok=True)
        (repo_cache / "snapshots" / oid / name).write_bytes(data)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    revision = {} if branch == "main" else {"revision": branch}
    with python_opens_under(bundle) as opened, attachments() as counts, library_messages() as messages:
        model = load_as_the_readme_says(REPO, **revision)
    assert opened == [] and counts["inject"] == 1 and messages == []
    assert_one_trainable_adapter(model)
    assert torch.equal(logits(model), want)
