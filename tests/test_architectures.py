"""Every supported architecture converts into a bundle that loads with PEFT and computes Q + scaling * B @ A.

One tiny random model per architecture (2 layers, hidden dims multiples of 64, GQA where the
architecture has it, intermediate != hidden); the bundle is checked against an independent float32
reference built from the source weights and the bundle's files (tests/reference.py).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM
from torch import nn

from quailora_convert.bundle.layout import INIT_ADAPTER_DIR
from quailora_convert.errors import UnsupportedModelError
from quailora_convert.convert import ConvertSettings, convert
from reference import assert_bundle_matches_reference, bundle_tensors, dequantize_saved, quantized_linears
from tiny_models import VOCAB, save_tiny, write_text_calibration

TOKENS = dict(vocab_size=VOCAB, pad_token_id=1, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
DECODER = dict(hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, **TOKENS)  # GQA: 2 query heads per KV head
LLAMA_GROUPS = {"self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.q_proj",
                "self_attn.v_proj": "self_attn.q_proj", "self_attn.o_proj": "self_attn.o_proj",
                "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.gate_proj", "mlp.down_proj": "mlp.down_proj"}
SEQ_LEN = 48  # calibration: longer than Gemma's sliding window of 16
NUM_SAMPLES = 16
BATCH_SIZE = 4


def _own_groups(*names: str) -> dict[str, str]:
    """Fused projections: every linear has an input of its own."""
    return {n: n for n in names}


@dataclass
class Case:
    id: str
    make_config: object  # () -> PretrainedConfig
    layers: str  # where the decoder layers live in the CausalLM
    groups: dict[str, str]  # linear (relative to its layer) -> the linear whose input H it shares
    strip_prefix: str = ""  # rewrite the checkpoint without this key prefix, as old Hub checkpoints are


def _llama():
    from transformers import LlamaConfig

    return LlamaConfig(**DECODER)


def _mistral():
    from transformers import MistralConfig

    return MistralConfig(**DECODER, sliding_window=16)  # one sliding mask for every layer


def _qwen2():
    from transformers import Qwen2Config

    return Qwen2Config(**DECODER)  # q/k/v carry biases


def _gemma2():
    from transformers import Gemma2Config

    # layer 0 slides over 16 tokens, layer 1 attends to everything; logit soft-capping on
    return Gemma2Config(**DECODER, sliding_window=16, layer_types=["sliding_attention", "full_attention"])


def _gemma3():
    from transformers import Gemma3TextConfig

    # sliding layers use the local rope base, full layers the global one: different masks and position embeddings
    return Gemma3TextConfig(**DECODER, sliding_window=16, layer_types=["sliding_attention", "full_attention"])


def _phi3():
    from transformers import Phi3Config

    return Phi3Config(**{k: v for k, v in DECODER.items() if k != "head_dim"}, max_position_embeddings=256,
                      original_max_position_embeddings=256)


def _opt():
    from transformers import OPTConfig

    return OPTConfig(hidden_size=128, ffn_dim=320, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=128,
                     max_position_embeddings=128, dropout=0.0, **TOKENS)  # no dropout: the bundle runs in train mode


def _bloom():
    from transformers import BloomConfig

    return BloomConfig(hidden_size=128, n_layer=2, n_head=4, **TOKENS)  # MLP is 4 * hidden


def _gpt_neox():
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=128, **TOKENS)


def _gpt2():
    from transformers import GPT2Config

    return GPT2Config(n_embd=128, n_inner=320, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, **TOKENS)  # Conv1D weights, stored (in, out)


NEOX_GROUPS = _own_groups("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
CASES = [
    Case("llama", _llama, "model.layers", LLAMA_GROUPS),
    Case("mistral", _mistral, "model.layers", LLAMA_GROUPS),
    Case("qwen2", _qwen2, "model.layers", LLAMA_GROUPS),
    Case("gemma2", _gemma2, "model.layers", LLAMA_GROUPS),
    Case("gemma3_text", _gemma3, "model.layers", LLAMA_GROUPS),
    Case("phi3", _phi3, "model.layers",
         _own_groups("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")),
    Case("opt", _opt, "model.decoder.layers",
         {"self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.q_proj",
          "self_attn.v_proj": "self_attn.q_proj", "self_attn.out_proj": "self_attn.out_proj", "fc1": "fc1", "fc2": "fc2"}),
    Case("bloom", _bloom, "transformer.h",
         _own_groups("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
                     "mlp.dense_4h_to_h")),
    Case("gpt_neox", _gpt_neox, "gpt_neox.layers", NEOX_GROUPS),
    Case("gpt2", _gpt2, "transformer.h", _own_groups("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")),
    # openai-community/gpt2 stores "h.0.attn.c_attn.weight", "wte.weight": no "transformer." prefix
    Case("gpt2-unprefixed", _gpt2, "transformer.h", _own_groups("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
         strip_prefix="transformer."),
]


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return write_text_calibration(tmp_path_factory.mktemp("calib") / "calib.jsonl")


@pytest.fixture(scope="module", params=CASES, ids=[c.id for c in CASES])
def converted(request, tmp_path_factory, calib):
    case: Case = request.param
    root = tmp_path_factory.mktemp(case.id)
    config = case.make_config()
    assert case.id.startswith(config.model_type)
    source = save_tiny(config, root / "source")
    if case.strip_prefix:
        _strip_key_prefix(source, case.strip_prefix)
    bundle = convert(ConvertSettings(model=str(source), out=root / "bundle", calib=str(calib), rank=8,
                                     num_samples=NUM_SAMPLES, seq_len=SEQ_LEN, batch_size=BATCH_SIZE,
                                     calib_dtype="float32",  # the paper's X; the bfloat16 replay: converted_bf16
                                     report_baseline=True))
    return case, source, bundle


@pytest.fixture(scope="module", params=CASES, ids=[c.id for c in CASES])
def converted_bf16(request, tmp_path_factory, calib):
    """The same sources (stored in bfloat16) calibrated by a bfloat16 forward, as auto does on fast devices."""
    case: Case = request.param
    root = tmp_path_factory.mktemp(case.id + "-bf16")
    source = save_tiny(case.make_config(), root / "source")
    if case.strip_prefix:
        _strip_key_prefix(source, case.strip_prefix)
    bundle = convert(ConvertSettings(model=str(source), out=root / "bundle", calib=str(calib), rank=8,
                                     num_samples=NUM_SAMPLES, seq_len=SEQ_LEN, batch_size=BATCH_SIZE,
                                     calib_dtype="bfloat16"))
    return case, source, bundle


def _strip_key_prefix(folder: Path, prefix: str) -> None:
    from safetensors.torch import load_file, save_file

    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        save_file({k.removeprefix(prefix): v for k, v in tensors.items()}, shard, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k.removeprefix(prefix): f for k, f in data["weight_map"].items()}
        index.write_text(json.dumps(data))


def _layer_linears(model: nn.Module, layers: str) -> dict[str, nn.Module]:
    """Linear-like modules inside the decoder layers of a loaded PEFT model, LoRA factors excluded."""
    from transformers.pytorch_utils import Conv1D

    inside = re.compile(rf"(^|\.){re.escape(layers)}\.\d+\.")
    return {
        n: m for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, Conv1D)) and inside.search(n) and not re.search(r"\.lora_(A|B)\.", n)
    }


def test_bundle_loads_quantized_and_only_lora_trains(converted):
    case, _, bundle = converted
    model = AutoPeftModelForCausalLM.from_pretrained(bundle / INIT_ADAPTER_DIR, is_trainable=True)
    linears = _layer_linears(model, case.layers)
    adapted = 2 * len(case.groups)
    assert len(linears) == adapted, sorted(linears)
    assert all(type(m).__name__ == "Linear4bit" for m in linears.values()), {n: type(m) for n, m in linears.items()}
    assert set(quantized_linears(model)) == set(linears)  # nothing outside the layers is quantized
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable), trainable
    assert len(trainable) == 2 * adapted


def test_bundle_logits_match_float32_reference(converted):
    _, source, bundle = converted
    torch.manual_seed(0)
    assert_bundle_matches_reference(source, bundle, torch.randint(4, VOCAB, (2, 40)))  # longer than the sliding window of 16


def test_report_errors_decrease_and_groups_follow_shared_inputs(converted):
    case, _, bundle = converted
    report = json.loads((bundle / "quailora_report.json").read_text())
    modules = report["modules"]
    assert len(modules) == 2 * len(case.groups)
    for m in modules:
        assert m["error_after"] <= m["error_svd_init"] * (1 + 1e-6), m
        assert m["error_svd_init"] <= m["error_before"] * (1 + 1e-6), m
        assert m["error_after"] < m["error_before"], m
    assert report["summary"]["relative_error_after"] < 0.95
    for index in range(2):
        prefix = f"{case.layers}.{index}."
        got = {m["module"][len(prefix):]: m["input_group"] for m in modules if m["module"].startswith(prefix)}
        want = {name: prefix + leader for name, leader in case.groups.items()}
        assert got == want


def _source_hessians(source, calib, modules: list[str], dtype: torch.dtype = torch.float32,
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(H, W) for each module: H = mean x x^T (in, in) over the calibration tokens, from the source
    model's own forward, and the source weight as (out, in), in float64.

    The batches are drawn as the converter draws them; the activations come from a plain
    transformers forward of the whole model, so every layer gets the masks and position embeddings
    the model itself gives it (Gemma's sliding and full layers differ).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quailora_convert.calibration.batches import make_batches, pad_token_id, sample_token_sequences
    from quailora_convert.calibration.texts import read_texts

    tokenizer = AutoTokenizer.from_pretrained(source)
    sequences = sample_token_sequences(read_texts(str(calib)), tokenizer, NUM_SAMPLES, SEQ_LEN, seed=0)
    batches = make_batches(sequences, BATCH_SIZE, pad_token_id(tokenizer))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval()
    sums = {name: [0.0, 0] for name in modules}
    mask = None

    def accumulate(name):
        def hook(module, args):
            X = args[0].reshape(-1, args[0].shape[-1])[mask.reshape(-1)].double()  # (tokens, in); OPT flattens
            sums[name][0] = sums[name][0] + X.T @ X
            sums[name][1] += X.shape[0]
        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(accumulate(name)) for name in modules]
    with torch.no_grad():
        for batch in batches:
            mask = batch.attention_mask.bool()
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    for handle in handles:
        handle.remove()
    found = {}
    for name, (total, count) in sums.items():
        module = model.get_submodule(name)
        W = module.weight.T if type(module).__name__ == "Conv1D" else module.weight  # (out, in)
        found[name] = (total / count, W.double())
    return found


def test_report_errors_are_those_of_the_source_models_activations(converted, calib):
    """error_before = tr(E H E^T) with H from the real model: the converter replayed every layer's call faithfully."""
    _assert_errors_from_the_model(converted, calib, torch.float32, rel=1e-4)


def test_a_bfloat16_replay_gives_the_bfloat16_models_activations(converted_bf16, calib):
    """The same with the model run in bfloat16 by transformers (its own masks and position tables in bfloat16)."""
    case, _, bundle = converted_bf16
    report = json.loads((bundle / "quailora_report.json").read_text())
    assert report["calibration"]["dtype"] == "bfloat16" and report["summary"]["relative_error_after"] < 0.9
    _assert_errors_from_the_model(converted_bf16, calib, torch.bfloat16, rel=1e-3)


def _assert_errors_from_the_model(converted, calib, dtype: torch.dtype, rel: float) -> None:
    _, source, bundle = converted
    report = json.loads((bundle / "quailora_report.json").read_text())
    saved = bundle_tensors(bundle)
    found = _source_hessians(source, calib, [m["module"] for m in report["modules"]], dtype)
    for m in report["modules"]:
        H, W = found[m["module"]]
        E = W - dequantize_saved(saved, m["module"]).double()  # what the converter quantized away
        want = float(((E @ H) * E).sum())
        assert m["error_before"] == pytest.approx(want, rel=rel), m["module"]


def _mixtral():
    from transformers import MixtralConfig

    return MixtralConfig(**DECODER, num_local_experts=4, num_experts_per_tok=2)


def _qwen3_moe():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**DECODER, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2)


@pytest.mark.parametrize("make_config", [_mixtral, _qwen3_moe], ids=["mixtral", "qwen3_moe"])
def test_fused_moe_experts_are_refused_before_writing(make_config, tmp_path, calib):
    """transformers 5 stores a layer's experts as 3-D parameters, not nn.Linear: refused up front."""
    from transformers import AutoModelForCausalLM

    config = make_config()
    with torch.device("meta"):
        layer = AutoModelForCausalLM.from_config(config).get_decoder().layers[0]
    assert any(p.ndim == 3 for p in layer.parameters())  # the premise: fused experts
    source = save_tiny(config, tmp_path / "source")
    out = tmp_path / "bundle"
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts"):
        convert(ConvertSettings(model=str(source), out=out, calib=str(calib), rank=8, num_samples=8, seq_len=32,
                                batch_size=4))
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]  # not even a hidden partial folder
