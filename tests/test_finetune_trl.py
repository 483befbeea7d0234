"""examples/finetune_trl.py: a few SFTTrainer steps on a tiny bundle train its one adapter, and only it, from Q + M.

Each run calls the example's main() in this process (a subprocess would re-import torch, transformers and TRL:
seconds each), with a callback that records the model as SFTTrainer hands it to the first training step.
"""
import hashlib
import importlib.util
import json
import shutil

import bitsandbytes as bnb
import pytest
import torch
from peft.tuners.tuners_utils import BaseTuner
from safetensors.torch import load_file
from transformers import TrainerCallback

from bundles import make_bundle
from paths import REPO
from quailora_convert.bundle.layout import ADAPTER_WEIGHTS, INIT_ADAPTER_DIR
from reference import reference_model, use_float32_compute

IDS = torch.randint(4, 500, (2, 24), generator=torch.Generator().manual_seed(0))
MODULES = 14  # 2 layers x (q, k, v, o, gate, up, down)
STEPS = 12
# A tiny repetitive corpus: a random model learns its next-word rule in a few steps at this learning rate.
WORDS = "aa bb cc dd ee ff gg hh ii jj kk ll".split()
RECORDS = [" ".join(WORDS[(start + k) % len(WORDS)] for k in range(24)) for start in range(len(WORDS))]


def load_example():
    spec = importlib.util.spec_from_file_location("finetune_trl", REPO / "examples" / "finetune_trl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXAMPLE = load_example()


class AtTheStart(TrainerCallback):
    """The model as the first training step gets it: every tensor of its state and its logits on IDS."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.state = snapshot(model)
        model.train()  # training_step does this first too; an eval-mode forward on CPU repacks 4-bit weights
        with torch.no_grad():
            self.logits = model(IDS).logits


def snapshot(model) -> dict[str, torch.Tensor]:
    """Every parameter, buffer and 4-bit quantization state tensor (state_dict), copied."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def is_lora(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def digests(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def fresh_logits(model) -> torch.Tensor:
    model.train()
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune_trl")
    source, bundle = make_bundle(root)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in RECORDS))
    return source, bundle, data, root


def fine_tune(converted, monkeypatch, out_name: str, *flags: str):
    """(trainer, AtTheStart, inject_adapter calls, train-mode flags of every 4-bit forward) of one example run."""
    _, bundle, data, root = converted
    injections, modes = [], []
    inject, forward = BaseTuner.inject_adapter, bnb.nn.Linear4bit.forward

    def counting_inject(self, *args, **kwargs):
        injections.append(type(self).__name__)
        return inject(self, *args, **kwargs)

    def recording_forward(self, *args, **kwargs):
        modes.append(self.training)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(BaseTuner, "inject_adapter", counting_inject)
    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", recording_forward)
    start = AtTheStart()
    argv = [str(bundle), "--data", str(data), "--out", str(root / out_name), "--steps", str(STEPS), "--lr", "1e-2",
            "--batch-size", "4", "--grad-accum", "2", "--max-length", "32", "--device", "cpu", *flags]
    return EXAMPLE.main(argv, callbacks=[start]), start, injections, modes


@pytest.fixture(scope="module")
def bundle_digests(converted) -> dict[str, str]:
    """sha256 of every file of the bundle before any training."""
    return digests(converted[1])


@pytest.fixture(scope="module")
def plain_run(converted, bundle_digests):
    with pytest.MonkeyPatch.context() as monkeypatch:
        return fine_tune(converted, monkeypatch, "plain")


def test_training_leaves_the_bundle_files_as_they_were(plain_run, converted, bundle_digests):
    assert digests(converted[1]) == bundle_digests  # the base's shards, config and the init adapter


def test_one_adapter_is_attached_and_trained(plain_run, converted):
    trainer, _, injections, _ = plain_run
    model = trainer.model
    assert injections == ["LoraModel"]  # once: no second adapter from transformers or TRL
    assert list(model.peft_config) == ["default"]
    assert len([n for n, _ in model.named_modules() if n.endswith(".lora_A.default")]) == MODULES
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * MODULES and all(is_lora(n) for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())  # TRL's bf16 cast undone

    _, _, _, root = converted
    saved = load_file(root / "plain" / EXAMPLE.ADAPTER_DIR / ADAPTER_WEIGHTS)
    assert len(saved) == 2 * MODULES
    for name, param in trainable.items():
        key = name.replace(".default.weight", ".weight")
        assert saved[key].dtype == torch.float32 and torch.equal(saved[key], param.detach()), key


def test_training_starts_from_the_bundle_and_changes_only_lora(plain_run, converted):
    trainer, start, _, modes = plain_run
    _, bundle, _, _ = converted
    fresh, _ = EXAMPLE.load_for_training(str(bundle), "cpu")
    loaded = snapshot(fresh)
    assert start.state.keys() == loaded.keys()
    for name, tensor in loaded.items():  # what the first step got is what the bundle holds, to the bit
        assert start.state[name].dtype == tensor.dtype and torch.equal(start.state[name], tensor), name

    after = snapshot(trainer.model)
    assert after.keys() == loaded.keys()
    lora = [name for name in loaded if is_lora(name)]
    assert len(lora) == 2 * MODULES
    for name, tensor in loaded.items():
        moved = not torch.equal(after[name], tensor)
        assert moved == is_lora(name), name  # every LoRA factor moved, nothing else did
    assert modes and all(modes)  # no 4-bit forward ran in eval mode


def test_step_zero_logits_are_q_plus_m(plain_run, converted):
    _, start, _, _ = plain_run
    source, bundle, _, _ = converted
    fresh, _ = EXAMPLE.load_for_training(str(bundle), "cpu")
    assert torch.equal(start.logits, fresh_logits(fresh))
    use_float32_compute(fresh)  # the bundle computes in bf16; the reference is float32
    reference = reference_model(source, bundle).train()
    got, want = fresh_logits(fresh), fresh_logits(reference)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()


def test_the_loss_falls(plain_run):
    trainer, _, _, _ = plain_run
    logged = losses(trainer)
    assert len(logged) == STEPS
    assert logged[-1] < logged[0] - 0.8, logged  # nats; measured 6.29 -> 4.97


def test_gradient_checkpointing_trains_the_same(plain_run, converted):
    plain, _, _, plain_modes = plain_run
    with pytest.MonkeyPatch.context() as monkeypatch:
        trainer, _, injections, modes = fine_tune(converted, monkeypatch, "checkpointed", "--gradient-checkpointing")
    assert trainer.model.get_base_model().is_activation_checkpointing
    assert not plain.model.get_base_model().is_activation_checkpointing
    assert injections == ["LoraModel"] and all(modes)
    # every training forward ran the 4-bit layers twice (the backward recomputes them); the callback's once
    assert len(modes) - MODULES == 2 * (len(plain_modes) - MODULES)
    checkpointed, reference = losses(trainer), losses(plain)
    assert checkpointed[0] == pytest.approx(reference[0], rel=1e-6)
    assert checkpointed[-1] < checkpointed[0] - 0.8, checkpointed
    assert checkpointed == pytest.approx(reference, rel=1e-6)  # the recomputation is exact in float32


def test_alpaca_records_become_prompt_and_completion(tmp_path):
    records = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
               {"instruction": "Say hi.", "input": "", "output": "hi"}]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records))
    dataset = EXAMPLE.load_dataset(str(path), "train")
    assert dataset.column_names == ["prompt", "completion"] and dataset["completion"] == ["5", "hi"]
    assert all(prompt.endswith("### Response:\n") for prompt in dataset["prompt"])  # the loss is on the output only
    assert "### Input:\n2 and 3" in dataset["prompt"][0] and "### Input:" not in dataset["prompt"][1]


def test_data_without_a_known_format_is_refused_in_one_line(tmp_path):
    path = tmp_path / "other.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(SystemExit, match=r"columns \['answer', 'question'\]; expected Alpaca"):
        EXAMPLE.load_dataset(str(path), "train")
    with pytest.raises(SystemExit, match="no such file"):
        EXAMPLE.load_dataset(str(tmp_path / "missing.jsonl"), "train")


def test_an_old_layout_bundle_and_a_used_out_are_refused_before_loading(plain_run, converted, tmp_path):
    _, bundle, data, root = converted
    old = tmp_path / "old-layout"
    shutil.copytree(bundle, old)
    for moved in (old / INIT_ADAPTER_DIR).iterdir():
        moved.rename(old / moved.name)
    with pytest.raises(SystemExit, match="adapter at the root .* convert the model again"):
        EXAMPLE.main([str(old), "--data", str(data), "--out", str(tmp_path / "out"), "--device", "cpu"])
    used = root / "plain"  # the plain run's output
    before = digests(used)
    with pytest.raises(SystemExit, match="exists: give another --out"):
        EXAMPLE.main([str(bundle), "--data", str(data), "--out", str(used), "--device", "cpu"])
    assert digests(used) == before


def test_the_printed_next_step_exports_the_trained_adapter(plain_run, converted, tmp_path):
    """`quailora-convert export ADAPTER --bundle B --merged OUT` takes what the example saved."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from quailora_convert.export import export_merged

    _, bundle, _, root = converted
    adapter = root / "plain" / EXAMPLE.ADAPTER_DIR
    assert f"quailora-convert export {adapter} --bundle {bundle} --merged" in EXAMPLE.next_steps(str(bundle), adapter)
    merged = AutoModelForCausalLM.from_pretrained(export_merged(adapter, bundle, tmp_path / "merged"))
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bundle, dtype=torch.float32), adapter)
    use_float32_compute(tuned)  # the trained 4-bit model as float32 arithmetic
    got, want = fresh_logits(merged.float()), fresh_logits(tuned)
    print(f"merged (bf16 weights) vs the trained 4-bit model: max |logit diff| {(got - want).abs().max():.2e}")
    assert torch.allclose(got, want, atol=2e-2, rtol=0), (got - want).abs().max()  # measured 5.7e-3
