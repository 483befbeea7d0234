"""The bundle loads as LoftQ's and PiSSA's checkpoints load: the quantized base at the root, the adapter in
quailora_init/ (bundle.layout.INIT_ADAPTER_DIR), checked against transformers 5.23 and peft 0.21.2.

- PEFT's QLoRA recipe, `PeftModel.from_pretrained(prepare_model_for_kbit_training(AutoModelForCausalLM
  .from_pretrained(B)), B, subfolder="quailora_init", is_trainable=True)`: from the folder, from a moved copy
  (never reading the old folder) and from the Hub;
- `AutoPeftModelForCausalLM.from_pretrained(f"{B}/quailora_init")`: it loads the base from the adapter config's
  base_model_name_or_path (peft/auto.py), the bundle's absolute path locally, the repo id on the Hub;
- a plain `AutoModelForCausalLM.from_pretrained(B)` is the quantized base alone: transformers looks for
  adapter_config.json at the root only (find_adapter_config_file), and there is none.
Each loads exactly one adapter (BaseTuner.inject_adapter counted), trainable, and computes Q + M against
the float32 reference (tests/reference.py). A bundle of the old layout (the adapter at the root) is refused.
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
from peft import AutoPeftModelForCausalLM, PeftModel, prepare_model_for_kbit_training
from peft.tuners.tuners_utils import BaseTuner
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from bundles import make_bundle
from quailora_convert.bundle.layout import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, CONFIG, INIT_ADAPTER_CONFIG,
                                            INIT_ADAPTER_DIR, INIT_ADAPTER_WEIGHTS)
from quailora_convert.bundle.read import describe_bundle, refuse_root_adapter, verify_bundle
from quailora_convert.errors import BadInputError
from quailora_convert.publish import push_to_hub
from reference import reference_model, use_float32_compute

REPO = "alice/tiny-quailora"
IDS = torch.randint(4, 500, (2, 24), generator=torch.Generator().manual_seed(0))
ADAPTED = 14  # q_proj ... down_proj of the tiny Llama's 2 layers
# peft 0.21.2 reads transformers 5.23's deprecated aliases: PeftModel.__init__ `model.is_gradient_checkpointing`,
# prepare_model_for_kbit_training `gradient_checkpointing_enable`. Library version noise, on every PeftModel.
PEFT_ON_TRANSFORMERS_5 = (
    "FutureWarning: `is_gradient_checkpointing` is deprecated and will be removed in v6. Use "
    "`is_activation_checkpointing` instead.",
    "FutureWarning: `gradient_checkpointing_enable` is deprecated and will be removed in v6. Use "
    "`activation_checkpointing_enable` instead.",
)


def load_for_training(where, **hub):
    """PEFT's QLoRA recipe (and LoftQ's): the quantized base, prepared for k-bit training, plus our adapter."""
    base = AutoModelForCausalLM.from_pretrained(where, **hub)
    base = prepare_model_for_kbit_training(base)
    return PeftModel.from_pretrained(base, where, subfolder=INIT_ADAPTER_DIR, is_trainable=True, **hub)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("loading"))  # (source, bundle)


@pytest.fixture(scope="module")
def want(converted):
    """Logits of the float32 reference: dequant(Q) + scaling * B @ A, and dequant(Q) alone."""
    source, bundle = converted
    return {"Q + M": logits(reference_model(source, bundle)), "Q": logits(reference_model(source, bundle, False))}


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
    """Every warning a user sees (warnings.warn) and WARNING+ log record (transformers' own tree included)
    within, less PEFT_ON_TRANSFORMERS_5 (which assert_version_noise_only checks stays that)."""
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
    seen = [f"{w.category.__name__}: {w.message}" for w in caught] + handler.lines
    found.extend(m for m in seen if m not in PEFT_ON_TRANSFORMERS_5)


def assert_one_trainable_adapter(model):
    assert isinstance(model, PeftModel) and list(model.peft_config) == ["default"]
    lora_a = [n for n, _ in model.named_modules() if n.endswith(".lora_A.default")]
    assert len(lora_a) == ADAPTED
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * ADAPTED and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def logits(model) -> torch.Tensor:
    model.train()  # eval on AVX512-BF16 CPUs swaps in a bf16 kernel (and repacks the 4-bit weights)
    with torch.no_grad():
        return model(IDS).logits


def assert_computes(model, want: dict[str, torch.Tensor]) -> None:
    """Q + M with the adapter, Q without it, both to float32 precision (the adapter matters)."""
    use_float32_compute(model)
    got = logits(model)
    assert torch.allclose(got, want["Q + M"], atol=1e-4, rtol=1e-4), (got - want["Q + M"]).abs().max()
    with model.disable_adapter():
        plain = logits(model)
    assert torch.allclose(plain, want["Q"], atol=1e-4, rtol=1e-4), (plain - want["Q"]).abs().max()
    assert not torch.allclose(plain, got, atol=1e-3)


@contextmanager
def python_opens_under(folder: Path):
    """Paths under folder that Python code opens within (the safetensors reader is Rust: see the garbage below)."""
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


def spoil(folder: Path) -> None:
    """Other adapter numbers, and base shards and config that fail if read at all."""
    adapter = load_file(folder / INIT_ADAPTER_WEIGHTS)
    save_file({k: 3 * v for k, v in adapter.items()}, folder / INIT_ADAPTER_WEIGHTS)
    for shard in folder.glob("model*.safetensors"):
        shard.write_bytes(b"not a safetensors file")
    (folder / CONFIG).write_text("{ not json")


def test_the_layout_is_loftq_s(converted):
    _, bundle = converted
    assert (bundle / INIT_ADAPTER_CONFIG).is_file() and (bundle / INIT_ADAPTER_WEIGHTS).is_file()
    assert not (bundle / ADAPTER_CONFIG).exists() and not (bundle / ADAPTER_WEIGHTS).exists()
    assert sorted(p.name for p in (bundle / INIT_ADAPTER_DIR).iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    adapter = json.loads((bundle / INIT_ADAPTER_CONFIG).read_text())
    assert adapter["base_model_name_or_path"] == str(bundle.resolve())  # where it was written: see the moved copy


def test_plain_transformers_loads_the_quantized_base_alone(converted, want):
    _, bundle = converted
    with attachments() as counts, library_messages() as messages:
        model = AutoModelForCausalLM.from_pretrained(bundle)
    assert counts["inject"] == 0 and messages == []
    assert not hasattr(model, "peft_config") and not any("lora_" in n for n, _ in model.named_modules())
    use_float32_compute(model)
    got = logits(model)
    assert torch.allclose(got, want["Q"], atol=1e-4, rtol=1e-4), (got - want["Q"]).abs().max()


def test_peft_s_qlora_recipe_loads_one_trainable_adapter_computing_q_plus_m(converted, want):
    _, bundle = converted
    with attachments() as counts, library_messages() as messages:
        model = load_for_training(bundle)
    assert counts["inject"] == 1 and messages == []
    assert_one_trainable_adapter(model)
    assert model.base_model.model.get_input_embeddings().weight.dtype == torch.float32  # prepared for k-bit
    assert_computes(model, want)


def test_peft_s_recipe_on_a_moved_copy_never_reads_the_old_folder(tmp_path):
    source, original = make_bundle(tmp_path)
    want = {"Q + M": logits(reference_model(source, original)), "Q": logits(reference_model(source, original, False))}
    moved = tmp_path / "elsewhere" / "moved"
    shutil.copytree(original, moved)
    spoil(original)
    with pytest.raises(OSError):  # what reading it gives
        load_for_training(original)
    with python_opens_under(original) as opened, attachments() as counts, library_messages() as messages:
        model = load_for_training(moved)
    assert opened == [] and counts["inject"] == 1 and messages == []
    assert_one_trainable_adapter(model)
    assert_computes(model, want)

    shutil.rmtree(original)  # the old folder gone
    assert_computes(load_for_training(moved), want)


def test_auto_peft_loads_the_adapter_folder_where_it_was_written(converted, want):
    _, bundle = converted
    with attachments() as counts, library_messages() as messages:
        model = AutoPeftModelForCausalLM.from_pretrained(f"{bundle}/{INIT_ADAPTER_DIR}", is_trainable=True)
    assert counts["inject"] == 1 and messages == []
    assert_one_trainable_adapter(model)
    assert_computes(model, want)


def test_auto_peft_on_a_moved_copy_fails_in_one_line_naming_the_old_folder(tmp_path):
    """base_model_name_or_path is the absolute path the bundle was written to; once it is gone transformers
    refuses it in one line (a relative path would be resolved against the working directory instead)."""
    _, original = make_bundle(tmp_path)
    moved = tmp_path / "elsewhere" / "moved"
    shutil.copytree(original, moved)
    shutil.rmtree(original)
    with attachments() as counts, pytest.raises(OSError) as error:
        AutoPeftModelForCausalLM.from_pretrained(f"{moved}/{INIT_ADAPTER_DIR}", is_trainable=True)
    assert counts["inject"] == 0
    message = str(error.value)
    assert "\n" not in message and f"'{original.resolve()}'" in message, message


@pytest.fixture(params=["main", "dev"])
def from_the_hub(converted, hub, tmp_path, monkeypatch, request):
    """{"revision": ...} of the pushed branch; downloads from the fake Hub (HTTP) into an empty HF cache.

    Online, as a first download is: peft 0.21.2's offline path (HF_HUB_OFFLINE=1, from the cache) asks
    hf_hub_download for subfolder/subfolder/adapter_model.safetensors (load_peft_weights) and fails, for
    every subfolder=... adapter (LoftQ's too).
    """
    _, bundle = converted
    branch = request.param
    push_to_hub(bundle, REPO, revision=None if branch == "main" else branch)
    commit = hub.commits[-1]
    assert INIT_ADAPTER_CONFIG in commit.files and ADAPTER_CONFIG not in commit.files
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    return {} if branch == "main" else {"revision": branch}


def test_peft_s_recipe_from_the_hub(converted, from_the_hub, want):
    _, bundle = converted
    with python_opens_under(bundle) as opened, attachments() as counts, library_messages() as messages:
        model = load_for_training(REPO, **from_the_hub)
    assert opened == [] and counts["inject"] == 1 and messages == []
    assert_one_trainable_adapter(model)
    assert model.peft_config["default"].base_model_name_or_path == REPO
    assert_computes(model, want)


def test_auto_peft_from_the_hub(converted, from_the_hub, want):
    """AutoPeftModelForCausalLM passes subfolder= on to the base's from_pretrained too (peft/auto.py), which then
    reads quailora_init/ as the base's folder and fails: the adapter folder is downloaded first and loaded as a
    folder, whose config names the repo (and branch) as the base."""
    from huggingface_hub import snapshot_download

    _, bundle = converted
    with pytest.raises(ValueError, match="Unrecognized model in alice/tiny-quailora"):
        AutoPeftModelForCausalLM.from_pretrained(REPO, subfolder=INIT_ADAPTER_DIR, **from_the_hub)
    with python_opens_under(bundle) as opened, attachments() as counts, library_messages() as messages:
        adapter = Path(snapshot_download(REPO, allow_patterns=f"{INIT_ADAPTER_DIR}/*", **from_the_hub))
        model = AutoPeftModelForCausalLM.from_pretrained(adapter / INIT_ADAPTER_DIR, is_trainable=True)
    assert opened == [] and counts["inject"] == 1 and messages == []
    assert_one_trainable_adapter(model)
    assert_computes(model, want)


def test_offline_after_a_download_needs_the_adapter_folder_s_path(converted, from_the_hub, monkeypatch, want):
    """peft 0.21.2 offline (HF_HUB_OFFLINE=1) looks for quailora_init/quailora_init/adapter_model.safetensors in the
    cache (load_peft_weights joins the subfolder twice); the downloaded adapter folder loads. If the first
    half fails, PEFT fixed it: the README's offline note can go."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    load_for_training(REPO, **from_the_hub)  # online: into the cache
    adapter = Path(snapshot_download(REPO, allow_patterns=f"{INIT_ADAPTER_DIR}/*", **from_the_hub)) / INIT_ADAPTER_DIR
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LocalEntryNotFoundError):
        load_for_training(REPO, **from_the_hub)
    base = prepare_model_for_kbit_training(AutoModelForCausalLM.from_pretrained(REPO, **from_the_hub))
    model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
    assert_one_trainable_adapter(model)
    assert_computes(model, want)


def test_the_version_noise_is_what_it_says(converted):
    """PEFT_ON_TRANSFORMERS_5 is all the recipe prints: when peft or transformers change, drop it."""
    _, bundle = converted
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_for_training(bundle)
    shown = {f"{w.category.__name__}: {w.message}" for w in caught if w.category is FutureWarning}
    assert shown == set(PEFT_ON_TRANSFORMERS_5)


def root_adapter_copy(bundle: Path, where: Path) -> Path:
    """The bundle in the layout before quailora_init/: the adapter beside the base."""
    old = shutil.copytree(bundle, where)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        (old / INIT_ADAPTER_DIR / name).rename(old / name)
    (old / INIT_ADAPTER_DIR).rmdir()
    return old


def test_a_bundle_of_the_old_layout_is_refused_in_one_line(converted, tmp_path):
    from quailora_convert.eval_settings import EvalSettings
    from quailora_convert.evaluate import evaluate
    from quailora_convert.model_card import render_model_card

    _, bundle = converted
    old = root_adapter_copy(bundle, tmp_path / "old")
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    refused = {
        "verify (inspect, push-to-hub)": lambda: verify_bundle(old),
        "inspect": lambda: describe_bundle(old),
        "card": lambda: render_model_card(old),
        "eval": lambda: evaluate(EvalSettings(bundle=old, skip_source=True, data="tiny")),
        "push-to-hub": lambda: push_to_hub(old, REPO, api=object()),  # refused before any request
    }
    for command, run in refused.items():
        with pytest.raises(BadInputError) as error:
            run()
        message = str(error.value)
        assert message == (f"{old} has its adapter at the root ({ADAPTER_CONFIG}), the layout of quailora-convert "
                           f"before {INIT_ADAPTER_DIR}/: convert the model again with this version"), command
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before  # nothing written
    refuse_root_adapter(bundle)  # the new layout passes
