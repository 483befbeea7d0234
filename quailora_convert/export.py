"""From a fine-tuned adapter of a bundle to what people serve: a merged checkpoint, or a LoRA for the source.

A bundle holds Q = quant(W) and, in quailora_init/, factors B0 A0 with scaling * B0 A0 ~ W - Q. Fine-tuning
from it (PeftModel.from_pretrained(base, BUNDLE, subfolder=INIT_ADAPTER_DIR, is_trainable=True)) gives B' A'.

- merged: dequant(Q) + scaling * B' A' per adapted linear, in the bundle's compute dtype (the source's), every
  other tensor as stored: what the fine-tuned QLoRA model computes, as a checkpoint plain transformers loads.
  (PEFT's merge_and_unload on the 4-bit model quantizes that sum again and loses the correction.)
- lora-for-source: a plain LoRA for the original W, scaling * (B' A' - B0 A0) as PEFT stores a converted
  PiSSA/OLoRA/CorDA adapter: [A'; A0] and [B', -B0] at rank 2r (core.lora.difference_factors). W plus it is
  the fine-tuned model with the base's residual error W - Q - scaling * B0 A0 taken out.

PEFT's own conversion (save_pretrained(..., path_initial_model_for_weight_conversion=...)) needs the whole
PeftModel in memory with both adapters loaded, and refuses rsLoRA with a rank or alpha pattern (it doubles
alpha_pattern by 2 where rsLoRA needs sqrt(2)), so the same math runs here one module at a time.

Both exports read one tensor at a time (safetensors safe_open) and write into a folder beside OUT that is
renamed into place at the end; a failed run leaves nothing at OUT. The fine-tuned adapter is refused unless it
was trained from this bundle: the same modules, shapes, rank and alpha settings, and lora_A factors still
aligned with the init's far beyond chance (see MIN_INIT_ALIGNMENT).
"""
from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import shutil
import tempfile
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from .bundle.layout import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, CONFIG, COPIED_FROM_SOURCE, DEFAULT_MAX_SHARD_BYTES,
                            INIT_ADAPTER_CONFIG, INIT_ADAPTER_DIR, INIT_ADAPTER_WEIGHTS, REPORT, SAFETENSORS_INDEX,
                            SAFETENSORS_SINGLE, config_dtype, index_json, read_config, read_weight_map, shard_name)
from .bundle.read import read_json, safetensors_problem, verify_bundle
from .bundle.safetensors_stream import SafetensorsStreamWriter, header_bytes_for
from .core.lora import adapter_key, alpha_for_doubled_rank, difference_factors, lora_scaling
from .errors import BadInputError

log = logging.getLogger(__name__)

# How far the fine-tuned lora_A factors are aligned with the init's, in standard deviations: per module the cosine of
# the flattened A' with A0 times sqrt(A's size), summed over modules and divided by sqrt(their count). For an A'
# independent of A0 (a fresh PEFT init, another bundle's adapter) each term is ~ N(0, 1), so the sum is too; an
# adapter fine-tuned from this init keeps A' = A0 + D, far above. Measured on the tiny test bundle (rank 4, 14
# modules of 512-1280 entries; random-token batches, the worst case for drift): 85 after 200 AdamW steps at lr 2e-4
# (worst module cosine 0.88), 40 at lr 1e-3, 10 after 200 steps at lr 1e-2 (|D| 20x |A0|, worst cosine 0.02).
# It grows with sqrt(size x modules): SmolLM2-135M (rank 16, 210 modules), 40 AdamW steps at lr 2e-4 on Alpaca
# text: 1515 (worst cosine 0.996); a fresh PEFT LoRA on the same bundle: -1.2.
MIN_INIT_ALIGNMENT = 6.0
_NF4_STATE = ".weight.quant_state.bitsandbytes__"  # + nf4 / fp4: the packed QuantState of a 4-bit weight
_INT8_SCALES = ".SCB"  # row scales of an LLM.int8 weight
_INT8_FORMAT = ".weight_format"
_HEADER_ROOM = 1 << 16  # a merged shard's header region: ~500 entries of 130 bytes
_CHECKED_PEFT_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")


@dataclass(frozen=True)
class AdaptedModule:
    path: str  # in the base model: model.layers.0.self_attn.q_proj
    rank: int
    scaling: float  # PEFT's, from the fine-tuned adapter's lora_alpha / alpha_pattern and rank


@dataclass
class ExportInputs:
    """A bundle and a fine-tuned adapter checked to belong together, with their files open for reading."""

    bundle: Path
    adapter: Path
    bundle_config: dict  # config.json, with quantization_config
    init_config: dict  # quailora_init/adapter_config.json
    tuned_config: dict  # ADAPTER/adapter_config.json
    report: dict
    modules: dict[str, AdaptedModule]
    init_cosines: dict[str, float]  # per module: cosine of the fine-tuned lora_A with the init's
    init_alignment: float = 0.0  # see MIN_INIT_ALIGNMENT
    _init: object = field(repr=False, default=None)  # safe_open handles
    _tuned: object = field(repr=False, default=None)

    def factors(self, path: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(A' (r, in), B' (out, r), A0, B0) of one module, as stored."""
        tuned, init = self._tuned, self._init
        return (tuned.get_tensor(adapter_key(path, "lora_A")), tuned.get_tensor(adapter_key(path, "lora_B")),
                init.get_tensor(adapter_key(path, "lora_A")), init.get_tensor(adapter_key(path, "lora_B")))

    def folders(self) -> list[Path]:
        """The input folders, which an output may neither be, hold nor lie in."""
        return [self.bundle, self.adapter]

    def delta(self, path: str) -> Tensor:
        """scaling * B' A' (out, in) in float32: what the fine-tuned adapter adds to the module's base weight."""
        A, B, _, _ = self.factors(path)
        return self.modules[path].scaling * (B.float() @ A.float())


# -- the two exports ---------------------------------------------------------------------------------------
def export_merged(adapter: Path, bundle: Path, out: Path, *, overwrite: bool = False,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: torch.dtype | None = None) -> Path:
    """OUT: a full-precision checkpoint of dequant(Q) + scaling * B' A' (plain transformers loads it).

    dtype: of the merged linears (computed in float32, rounded once) and of config.json; default the source's
    (merged_dtype). Every other tensor keeps its stored dtype.
    """
    with open_inputs(adapter, bundle) as inputs, staged_folder(out, overwrite, inputs.folders()) as folder:
        config = {k: v for k, v in inputs.bundle_config.items() if k != "quantization_config"}
        dtype = dtype or merged_dtype(inputs.bundle_config)
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)  # the older spelling of the same field
        (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        transposed = stored_transposed(inputs.bundle_config, set(inputs.modules))
        shards = ShardedWriter(folder, max_shard_bytes)
        try:
            with BundleTensors(inputs.bundle) as tensors:
                for name, tensor in merged_tensors(inputs, tensors, dtype, transposed):
                    shards.add(name, tensor)
        except BaseException:
            shards.discard()  # the staging folder goes with it
            raise
        shards.close()
        _copy_files(inputs.bundle, folder, COPIED_FROM_SOURCE)
    return Path(out)


def export_lora_for_source(adapter: Path, bundle: Path, out: Path, *, overwrite: bool = False) -> Path:
    """OUT: a LoRA adapter of rank 2r for the bundle's source, scaling * (B' A' - B0 A0) per module."""
    with open_inputs(adapter, bundle) as inputs, staged_folder(out, overwrite, inputs.folders()) as folder:
        names = [adapter_key(path, factor) for path in inputs.modules for factor in ("lora_A", "lora_B")]
        writer = SafetensorsStreamWriter(folder / ADAPTER_WEIGHTS, header_bytes_for(names))
        try:
            for path in inputs.modules:
                lora_A, lora_B = difference_factors(*inputs.factors(path))  # (2r, in), (out, 2r)
                writer.add(adapter_key(path, "lora_A"), lora_A)
                writer.add(adapter_key(path, "lora_B"), lora_B)
        except BaseException:
            writer.discard()
            raise
        writer.close()
        config = source_adapter_config(inputs.tuned_config, inputs.report)
        config["fan_in_fan_out"] = bool(stored_transposed(inputs.bundle_config, set(inputs.modules)))
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return Path(out)


def merged_tensors(inputs: ExportInputs, tensors: BundleTensors, dtype: torch.dtype,
                   transposed: set[str]) -> Iterator[tuple[str, Tensor]]:
    """The merged checkpoint's tensors in the bundle's order, one at a time: adapted and quantized linears merged
    and dequantized (as the source stores them: (in, out) for Conv1D), the rest as stored."""
    quantized = tensors.quantized_modules()
    companions = {name for names in quantized.values() for name in names}
    for name in tensors.names:
        if name in companions:
            continue
        module = name.removesuffix(".weight")
        if module not in quantized and module not in inputs.modules:
            yield name, tensors.get(name)
            continue
        if module in quantized:
            W = tensors.dequantized(module)  # (out, in) float32
        else:  # an adapted linear kept in full precision
            W = tensors.get(name).float()
            W = W.T if module in transposed else W
        if module in inputs.modules:
            W = W + inputs.delta(module)
        yield name, (W.T if module in transposed else W).to(dtype).contiguous()


def merged_dtype(bundle_config: dict) -> torch.dtype:
    """The merged linears' dtype: the source's (config.json), else the 4-bit compute dtype, else float32."""
    stated = config_dtype(bundle_config)
    if stated is not None:
        return stated
    compute = config_dtype({"dtype": (bundle_config.get("quantization_config") or {}).get("bnb_4bit_compute_dtype")})
    return compute or torch.float32


def source_adapter_config(tuned_config: dict, report: dict) -> dict:
    """The fine-tuned adapter's config for factors of twice its rank, over the source model.

    r, rank_pattern doubled; lora_alpha, alpha_pattern scaled so that every module keeps its scaling
    (core.lora.alpha_for_doubled_rank); base_model_name_or_path the report's source, at its commit.
    """
    rslora = bool(tuned_config.get("use_rslora"))
    config = dict(tuned_config)
    config["r"] = 2 * int(tuned_config["r"])
    config["lora_alpha"] = alpha_for_doubled_rank(tuned_config["lora_alpha"], rslora)
    config["rank_pattern"] = {k: 2 * int(v) for k, v in (tuned_config.get("rank_pattern") or {}).items()}
    config["alpha_pattern"] = {k: alpha_for_doubled_rank(v, rslora)
                               for k, v in (tuned_config.get("alpha_pattern") or {}).items()}
    config["init_lora_weights"] = True
    config["inference_mode"] = True
    name, revision = source_name(report)
    config["base_model_name_or_path"] = name
    config["revision"] = revision
    return config


def source_name(report: dict) -> tuple[str, str | None]:
    """(name, revision) of the model the bundle was converted from: the Hub repo at its commit, or MODEL."""
    source = report.get("source") or {}
    if source.get("repo_id"):
        return source["repo_id"], source.get("commit")
    if not source.get("model"):
        raise BadInputError(f"{REPORT} names no source model (source.model): the bundle is damaged; convert it again")
    return str(source["model"]), None


# -- checking the inputs -----------------------------------------------------------------------------------
@contextmanager
def open_inputs(adapter: Path, bundle: Path) -> Iterator[ExportInputs]:
    """The bundle and the fine-tuned adapter, checked (BadInputError naming what does not fit), files open."""
    from safetensors import safe_open

    bundle, adapter = verify_bundle(Path(bundle)), check_adapter(Path(adapter).expanduser())
    inputs = ExportInputs(bundle=bundle, adapter=adapter, bundle_config=read_config(bundle),
                          init_config=read_json(bundle / INIT_ADAPTER_CONFIG, "the init adapter config"),
                          tuned_config=read_json(adapter / ADAPTER_CONFIG, "the fine-tuned adapter config"),
                          report=read_json(bundle / REPORT, "the conversion report"), modules={}, init_cosines={})
    with ExitStack() as stack:
        inputs._init = stack.enter_context(safe_open(str(bundle / INIT_ADAPTER_WEIGHTS), "pt"))
        inputs._tuned = stack.enter_context(safe_open(str(adapter / ADAPTER_WEIGHTS), "pt"))
        _check_configs(inputs)
        _check_modules(inputs)
        named_elsewhere = _check_base_name(inputs)
        _check_fingerprint(inputs)
        if named_elsewhere:
            log.warning("%s names %s as its base, the bundle's %s/ names %s; its modules, shapes and factors are the "
                        "bundle's, so it is exported", inputs.adapter / ADAPTER_CONFIG, named_elsewhere,
                        INIT_ADAPTER_DIR, inputs.init_config.get("base_model_name_or_path"))
        yield inputs


def check_adapter(adapter: Path) -> Path:
    """The fine-tuned adapter folder (as PEFT's save_pretrained writes it), resolved."""
    if not adapter.is_dir():
        raise BadInputError(f"ADAPTER {adapter} is not a folder (give the folder model.save_pretrained wrote)")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (adapter / name).is_file():
            raise BadInputError(f"ADAPTER {adapter} is not a PEFT adapter folder: {name} is missing "
                                "(save it with model.save_pretrained(ADAPTER), safetensors on)")
    problem = safetensors_problem(adapter / ADAPTER_WEIGHTS)
    if problem:
        raise BadInputError(f"{adapter / ADAPTER_WEIGHTS} is {problem}; save the adapter again")
    return adapter.resolve()


def _check_configs(inputs: ExportInputs) -> None:
    tuned, init, where = inputs.tuned_config, inputs.init_config, inputs.adapter / ADAPTER_CONFIG
    if tuned.get("peft_type", "LORA") != "LORA":
        raise BadInputError(f"{where} is a {tuned.get('peft_type')} adapter; export takes the LoRA adapter "
                            f"fine-tuned from the bundle's {INIT_ADAPTER_DIR}/")
    extras = [name for name, plain in (("use_dora", False), ("modules_to_save", None), ("bias", "none"),
                                       ("lora_bias", False)) if tuned.get(name, plain) not in (plain, [], {})]
    if extras:
        raise BadInputError(f"{where} sets {', '.join(extras)}: export handles plain LoRA factors only "
                            "(train with the bundle's adapter config as loaded)")
    for name in _CHECKED_PEFT_FIELDS:
        if (tuned.get(name) or None) != (init.get(name) or None):
            raise BadInputError(f"{where} has {name} {tuned.get(name)!r}, the bundle's {INIT_ADAPTER_DIR}/ "
                                f"{init.get(name)!r}: the adapter was not trained from this bundle")
    if sorted(tuned.get("target_modules") or []) != sorted(init.get("target_modules") or []):
        raise BadInputError(f"{where} targets {sorted(tuned.get('target_modules') or [])}, the bundle's "
                            f"{INIT_ADAPTER_DIR}/ {sorted(init.get('target_modules') or [])}: "
                            "the adapter was not trained from this bundle")


def _lora_modules(handle) -> set[str]:
    suffix = ".lora_A.weight"
    return {key[len("base_model.model."):-len(suffix)] for key in handle.keys() if key.endswith(suffix)}


def _check_modules(inputs: ExportInputs) -> None:
    from peft.utils.other import get_pattern_key

    init_modules, tuned_modules = _lora_modules(inputs._init), _lora_modules(inputs._tuned)
    where = inputs.adapter / ADAPTER_WEIGHTS
    if init_modules != tuned_modules:
        differ = sorted(init_modules ^ tuned_modules)
        raise BadInputError(f"{where} adapts other modules than the bundle's {INIT_ADAPTER_DIR}/ (e.g. {differ[0]}; "
                            f"{len(differ)} differ): the adapter was not trained from this bundle")
    expected = {adapter_key(p, f) for p in init_modules for f in ("lora_A", "lora_B")}
    unexpected = sorted(set(inputs._tuned.keys()) - expected)
    if unexpected:
        raise BadInputError(f"{where} holds {unexpected[0]} (and {len(unexpected) - 1} more tensors) beyond LoRA "
                            "factors: export handles plain LoRA adapters only")
    config = inputs.tuned_config
    for path in sorted(init_modules, key=_natural_key):
        for factor in ("lora_A", "lora_B"):
            key = adapter_key(path, factor)
            tuned_shape = inputs._tuned.get_slice(key).get_shape()
            init_shape = inputs._init.get_slice(key).get_shape()
            if tuned_shape != init_shape:
                raise BadInputError(f"{where}: {key} is {tuple(tuned_shape)}, the bundle's {tuple(init_shape)}: "
                                    "the adapter was not trained from this bundle")
        rank = inputs._tuned.get_slice(adapter_key(path, "lora_A")).get_shape()[0]
        alpha_key = get_pattern_key((config.get("alpha_pattern") or {}).keys(), path)
        alpha = (config.get("alpha_pattern") or {}).get(alpha_key, config["lora_alpha"])
        inputs.modules[path] = AdaptedModule(path, rank, lora_scaling(alpha, rank, bool(config.get("use_rslora"))))


def _check_fingerprint(inputs: ExportInputs) -> None:
    """The fine-tuned lora_A factors are aligned with the init's far beyond chance (>= MIN_INIT_ALIGNMENT)."""
    sizes = {}
    for path in inputs.modules:
        A, _, A0, _ = inputs.factors(path)
        cosine = torch.nn.functional.cosine_similarity(A.float().reshape(1, -1), A0.float().reshape(1, -1)).item()
        inputs.init_cosines[path], sizes[path] = cosine, A.numel()
    inputs.init_alignment = init_alignment(inputs.init_cosines, sizes)
    if inputs.init_alignment < MIN_INIT_ALIGNMENT:
        raise BadInputError(f"ADAPTER {inputs.adapter} was not fine-tuned from this bundle: its lora_A factors are "
                            f"aligned with the bundle's {INIT_ADAPTER_DIR}/ at {inputs.init_alignment:.1f} standard "
                            f"deviations (a fresh LoRA ~ 0 +- 1; one trained from the init >= {MIN_INIT_ALIGNMENT:g})")


def init_alignment(cosines: dict[str, float], sizes: dict[str, int]) -> float:
    """sum over modules of cosine * sqrt(size), / sqrt(modules): ~ N(0, 1) for factors independent of the init's."""
    return sum(c * math.sqrt(sizes[p]) for p, c in cosines.items()) / math.sqrt(len(cosines))


def _check_base_name(inputs: ExportInputs) -> str | None:
    """BadInputError when the adapter's base_model_name_or_path names the source (it was trained on the source,
    not on the bundle); the name when it is neither the bundle nor what its init adapter names (a moved or
    downloaded bundle, warned about once the factors matched), else None."""
    named = inputs.tuned_config.get("base_model_name_or_path")
    if named in (None, inputs.init_config.get("base_model_name_or_path"), str(inputs.bundle)):
        return None
    source = inputs.report.get("source") or {}
    if named in {source.get("model"), source.get("given"), source.get("repo_id")} - {None}:
        raise BadInputError(f"{inputs.adapter / ADAPTER_CONFIG} names the source {named} as its base: it was trained "
                            f"on the source model, not on this bundle")
    return named


def _natural_key(path: str) -> list:
    return [int(part) if part.isdigit() else part for part in path.split(".")]


# -- reading the bundle's base -----------------------------------------------------------------------------
class BundleTensors:
    """The bundle's base tensors by name, read one at a time from its shards."""

    def __init__(self, bundle: Path):
        self.bundle = Path(bundle)
        index = self.bundle / SAFETENSORS_INDEX
        self._file_of = read_weight_map(index) if index.is_file() else None
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}
        if self._file_of is None:
            self._file_of = {name: SAFETENSORS_SINGLE for name in self._handle(SAFETENSORS_SINGLE).keys()}
        self.names = list(self._file_of)
        self._quantized: dict[str, list[str]] | None = None

    def __enter__(self) -> BundleTensors:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _handle(self, filename: str):
        from safetensors import safe_open

        if filename not in self._handles:
            self._handles[filename] = self._stack.enter_context(safe_open(str(self.bundle / filename), "pt"))
        return self._handles[filename]

    def get(self, name: str) -> Tensor:
        try:
            return self._handle(self._file_of[name]).get_tensor(name)
        except Exception as e:  # SafetensorError: a shard changed or damaged since it was checked
            raise BadInputError(f"{name} cannot be read from {self.bundle / self._file_of[name]} ({e}): "
                                "the bundle is damaged; convert it again") from e

    def quantized_modules(self) -> dict[str, list[str]]:
        """module -> the statistics stored beside its quantized weight (NF4/FP4: absmax, quant_map, ...,
        quant_state; LLM.int8: SCB, weight_format)."""
        if self._quantized is None:
            modules = {n.split(_NF4_STATE)[0] for n in self.names if _NF4_STATE in n}
            modules |= {n.removesuffix(_INT8_SCALES) for n in self.names if n.endswith(_INT8_SCALES)}
            self._quantized = {module: [] for module in modules}
            for name in self.names:  # module.weight.absmax, ...; module.SCB, module.weight_format (not its bias)
                module = name.split(".weight.")[0] if ".weight." in name else name.rsplit(".", 1)[0]
                if module in self._quantized and name[len(module):] not in (".weight", ".bias"):
                    self._quantized[module].append(name)
        return self._quantized

    def dequantized(self, module: str) -> Tensor:
        """The (out, in) weight the loaded bnb layer computes with, in float32, from the stored tensors."""
        names = [f"{module}.weight", *self.quantized_modules()[module]]
        return dequantize_stored({name[len(module) + 1:]: self.get(name) for name in names})


def dequantize_stored(tensors: dict[str, Tensor]) -> Tensor:
    """(out, in) float32 from one bnb layer's saved tensors keyed by suffix (weight, weight.absmax, ..., SCB):
    the inverse of core.quantize's backends, as the loaded layer dequantizes (4-bit: straight to float32)."""
    import bitsandbytes.functional as bnbF

    if "SCB" in tensors:
        return bnbF.int8_vectorwise_dequant(tensors["weight"], tensors["SCB"]).float()
    state = bnbF.QuantState.from_dict({k.removeprefix("weight."): v for k, v in tensors.items() if k != "weight"},
                                      device=torch.device("cpu"))
    state.dtype = torch.float32
    return bnbF.dequantize_4bit(tensors["weight"], state)


def stored_transposed(config: dict, modules: set[str]) -> set[str]:
    """The Conv1D modules (weights stored (in, out)) among modules, from a meta-device model of config."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    plain = {k: v for k, v in config.items() if k != "quantization_config"}
    model_type = plain.pop("model_type", None)
    try:
        model_config = AutoConfig.for_model(model_type, **plain)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config)
    except (ValueError, KeyError) as e:
        raise BadInputError(f"{CONFIG} of the bundle names a model transformers does not build ({e})") from e
    return {name for name, module in model.named_modules() if isinstance(module, Conv1D) and name in modules}


# -- writing -----------------------------------------------------------------------------------------------
class ShardedWriter:
    """A checkpoint's safetensors shards written tensor by tensor, named and indexed as transformers does."""

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self._done: list[tuple[Path, list[str], int]] = []  # (file, tensor names, bytes) of closed shards
        self._shard: SafetensorsStreamWriter | None = None

    def add(self, name: str, tensor: Tensor) -> None:
        shard = self._shard
        if shard is None or shard.nbytes >= self.max_shard_bytes or not shard.fits(name, tensor):
            self._close_shard()
            path = self.folder / f".shard-{len(self._done) + 1:05d}.safetensors"
            self._shard = SafetensorsStreamWriter(path, _HEADER_ROOM)
        self._shard.add(name, tensor)

    def _close_shard(self) -> None:
        if self._shard is not None:
            self._shard.close()
            self._done.append((self._shard.path, self._shard.names(), self._shard.nbytes))
            self._shard = None

    def discard(self) -> None:
        """Stop writing, the files as they are (for a run that failed)."""
        if self._shard is not None:
            self._shard.discard()
            self._shard = None

    def close(self) -> None:
        self._close_shard()
        if not self._done:
            raise BadInputError("the bundle holds no base tensors to merge: it is damaged; convert it again")
        if len(self._done) == 1:
            self._done[0][0].rename(self.folder / SAFETENSORS_SINGLE)
            return
        weight_map, total = {}, 0
        for k, (path, names, nbytes) in enumerate(self._done, 1):
            final = shard_name(k, len(self._done))
            path.rename(self.folder / final)
            weight_map.update({name: final for name in names})
            total += nbytes
        (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index_json(weight_map, total), indent=2) + "\n")


def _copy_files(source: Path, folder: Path, patterns: list[str]) -> None:
    for path in sorted(Path(source).iterdir()):
        if path.is_file() and any(fnmatch.fnmatch(path.name, p) for p in patterns):
            shutil.copyfile(path, folder / path.name)


@contextmanager
def staged_folder(out: Path, overwrite: bool, inputs: list[Path]) -> Iterator[Path]:
    """A new folder beside OUT to write into, renamed to OUT when the block ends without error.

    OUT is refused when it exists (unless overwrite: then replaced, but never when it is or holds an input);
    on error the staging folder, which this run created, is removed and OUT is untouched.
    """
    out = Path(out).expanduser()
    _check_out(out, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".quailora-export", dir=out.parent))
    try:
        yield staging
        _publish(staging, out, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _check_out(out: Path, overwrite: bool, inputs: list[Path]) -> None:
    resolved = out.resolve()
    for given in inputs:
        if resolved == given or given.is_relative_to(resolved) or resolved.is_relative_to(given):
            raise BadInputError(f"OUT {out} is, holds or lies inside the input {given}: choose a folder outside it")
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise BadInputError(f"OUT {out} exists and is not a folder; choose another path")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise BadInputError(f"OUT {out} already exists; choose another folder or pass --overwrite")
    if not ((out / CONFIG).is_file() or (out / ADAPTER_CONFIG).is_file()):
        raise BadInputError(f"OUT {out} holds no {CONFIG} or {ADAPTER_CONFIG}: --overwrite replaces only a checkpoint "
                            "or adapter folder; choose another folder")


def _publish(staging: Path, out: Path, overwrite: bool) -> None:
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty folder named as OUT
    if out.exists():
        if not overwrite:
            raise BadInputError(f"OUT {out} appeared while this export ran; choose another folder or pass --overwrite")
        replaced = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".replaced", dir=out.parent))
        os.rename(out, replaced / out.name)
        os.rename(staging, out)
        shutil.rmtree(replaced)
        return
    os.rename(staging, out)
