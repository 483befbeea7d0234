"""Lazy reading of a safetensors checkpoint and per-module materialisation onto a meta skeleton."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..bundle.layout import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, read_weight_map
from ..errors import BadInputError, UnsupportedModelError


FINITE_CHECK_CHUNK = 1 << 24  # elements per isfinite pass
SHOWN_MISSING = 3  # missing tensors named in one error line


class DamagedSourceError(BadInputError):
    """A file of the source checkpoint is missing, unreadable, or holds NaN/inf; path is that file."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = Path(path)


class CheckpointReader:
    """Tensors of a (possibly sharded) safetensors checkpoint, read one at a time.

    File handles are opened on demand and dropped by release(): a memory-mapped shard keeps the
    pages it has served resident, so the pipeline releases after each layer to bound its RSS.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.key_to_file = _key_to_file(self.folder)
        self._handles: dict[str, object] = {}

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def get(self, key: str) -> torch.Tensor:
        """The tensor as stored; BadInputError naming it and its file when it is unreadable or not finite.

        Every tensor a conversion copies or computes with is read here, so this is the one check for
        NaN/inf in the source (one isfinite pass per tensor, negligible next to quantizing it).
        """
        filename = self.key_to_file[key]
        path = self.folder / filename
        if filename not in self._handles:
            self._handles[filename] = open_safetensors(path)
        try:
            tensor = self._handles[filename].get_tensor(key)
        except SafetensorError as e:
            raise DamagedSourceError(f"{key} cannot be read from {path} ({e}): the shard looks truncated or corrupt; "
                                     "re-download the model", path) from e
        check_finite(tensor, key, path)
        return tensor

    def release(self) -> None:
        self._handles.clear()

    def check_files(self) -> None:
        """Before any heavy work: every file the checkpoint lists exists, has a readable safetensors header,
        and holds the tensors listed in it (a missing shard is named now, not at its layer)."""
        listed: dict[str, list[str]] = {}
        for key, filename in self.key_to_file.items():
            listed.setdefault(filename, []).append(key)
        for filename, keys in listed.items():
            path = self.folder / filename
            with open_safetensors(path) as f:
                held = set(f.keys())
            absent = [key for key in keys if key not in held]
            if absent:
                raise DamagedSourceError(f"{path} lacks {_listed(absent)}, which {SAFETENSORS_INDEX} lists in it: "
                                         "the download is incomplete or the index is stale; re-download the model",
                                         path)


def _key_to_file(folder: Path) -> dict[str, str]:
    index = folder / SAFETENSORS_INDEX
    if index.exists():
        try:
            return read_weight_map(index)
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError and UnicodeDecodeError too
            raise BadInputError(f"{index} is not a valid shard index (a JSON object with a weight_map): it looks "
                                "truncated or corrupt; re-download the model") from e
    single = folder / SAFETENSORS_SINGLE
    if single.exists():
        with open_safetensors(single) as f:
            return {k: SAFETENSORS_SINGLE for k in f.keys()}
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise UnsupportedModelError(f"{folder} holds only pickle (.bin) weights; pass --allow-pickle if you trust them")
    raise BadInputError(f"{folder} has no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}")


def open_safetensors(path: Path):
    """safe_open(path), with a truncated, corrupt or missing shard as one BadInputError naming the file."""
    if not path.is_file():
        raise DamagedSourceError(f"{path} is missing (the checkpoint lists tensors in it): the download is incomplete; "
                                 "re-download the model", path)
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise DamagedSourceError(f"{path} is not a readable safetensors file ({e}): it looks truncated or corrupt; "
                                 "re-download the model", path) from e


def check_finite(tensor: torch.Tensor, key: str, path: Path) -> None:
    """BadInputError naming the tensor and its file when a floating tensor holds NaN or inf."""
    if not tensor.is_floating_point():
        return
    if tensor.element_size() == 1:  # float8: no sum/isfinite kernels for every kind
        tensor = tensor.float()
    # NaN and inf propagate through a sum, so a finite sum proves every value finite: one reduction, ~25x
    # cheaper than isfinite(t).all() on CPU (which costs a third of an int8 quantization).
    if bool(torch.isfinite(tensor.sum())):
        return
    nan = inf = 0  # the sum is not finite: count exactly (a finite tensor whose sum overflowed passes)
    for part in tensor.reshape(-1).split(FINITE_CHECK_CHUNK):  # bounds the temporary masks of a large embedding
        nan, inf = nan + int(torch.isnan(part).sum()), inf + int(torch.isinf(part).sum())
    if nan or inf:
        raise DamagedSourceError(f"{key} in {path} has non-finite values ({nan} NaN, {inf} inf of {tensor.numel()}): "
                                 "the checkpoint is corrupt or was saved from a diverged run; re-download or re-export it",
                                 path)


class KeyMap:
    """Translates between the skeleton's state-dict names and the checkpoint's keys.

    A checkpoint key is first renamed as transformers renames it on loading (rename: GPT-NeoX's
    "embed_out" is the model's "lm_head"); some checkpoints also drop the base-model prefix (GPT-2's
    "h.0.attn..." for "transformer.h.0.attn...").
    """

    def __init__(self, model_keys: list[str], checkpoint_keys: list[str], base_prefix: str,
                 rename: Callable[[str], str] = lambda key: key):
        wanted = set(model_keys)
        renamed = {key: rename(key) for key in checkpoint_keys}
        self.to_checkpoint: dict[str, str] = {}
        for with_prefix in (False, True):  # a key found as is wins over one found by adding the prefix
            for key, name in renamed.items():
                if with_prefix:
                    name = f"{base_prefix}.{name}" if base_prefix else None
                if name in wanted and name not in self.to_checkpoint:
                    self.to_checkpoint[name] = key
        self.to_model = {c: m for m, c in self.to_checkpoint.items()}

    def checkpoint_key(self, model_key: str) -> str:
        try:
            return self.to_checkpoint[model_key]
        except KeyError:
            raise UnsupportedModelError(f"the checkpoint has no tensor for {model_key}") from None

    def model_key(self, checkpoint_key: str) -> str:
        return self.to_model.get(checkpoint_key, checkpoint_key)

    def check_complete(self, model: nn.Module, folder: Path) -> None:
        """BadInputError naming every parameter model needs that the checkpoint lacks (before any heavy work).

        A tied parameter (transformers' all_tied_weights_keys: the output head of a tie_word_embeddings
        model) is filled from the one it is tied to, so the checkpoint need not store it.
        """
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})
        missing = [name for name, _ in model.named_parameters() if name not in tied and name not in self.to_checkpoint]
        if not missing:
            return
        head = model.get_output_embeddings()
        untied_head = head is not None and any(head.weight is p for n, p in model.named_parameters() if n in missing)
        hint = (" (config.json unties the output head: if it shares the embedding's weights, set "
                "tie_word_embeddings to true there)" if untied_head else "")
        raise BadInputError(f"the checkpoint in {folder} has no tensor for {_listed(missing)}, which the model of "
                            f"config.json needs{hint}: the download is incomplete or the shards do not match "
                            "config.json; re-download the model")


def open_checkpoint(folder: Path, model: nn.Module, shards_present: bool = True) -> tuple[CheckpointReader, KeyMap]:
    """The checkpoint in folder for the skeleton model, checked before any heavy work: every listed file
    readable (shards_present; a plan of a Hub model has the index only) and every parameter there."""
    reader = CheckpointReader(folder)
    if shards_present:
        reader.check_files()
    key_map = KeyMap(list(model.state_dict()), reader.keys(), model.base_model_prefix, transformers_renaming(model))
    key_map.check_complete(model, folder)
    return reader, key_map


def _listed(names: list[str]) -> str:
    """'a, b, c and 4 more'."""
    shown = ", ".join(names[:SHOWN_MISSING])
    return shown + (f" and {len(names) - SHOWN_MISSING} more" if len(names) > SHOWN_MISSING else "")


def read_parameter(reader: CheckpointReader, key_map: KeyMap, prefix: str, name: str) -> torch.Tensor:
    """The parameter name of the module at prefix ("model.layers.3."), as stored in the checkpoint."""
    return reader.get(key_map.checkpoint_key(f"{prefix}{name}"))


def materialize(module: nn.Module, prefix: str, reader: CheckpointReader, key_map: KeyMap,
                device: torch.device, dtype: torch.dtype,
                read: dict[str, torch.Tensor] | None = None) -> dict[str, torch.dtype]:
    """Load module's own parameters from the checkpoint onto device as dtype (float only).

    read: the parameters already read (by name relative to module, as stored; a prefetch), else they are
    read here. Pinned host tensors go to the device asynchronously. Returns each parameter's stored dtype,
    by name relative to module.
    """
    stored: dict[str, torch.dtype] = {}
    for name, param in list(module.named_parameters()):
        tensor = read[name] if read is not None else read_parameter(reader, key_map, prefix, name)
        if tensor.shape != param.shape:
            raise UnsupportedModelError(
                f"{prefix}{name}: checkpoint shape {tuple(tensor.shape)} != config shape {tuple(param.shape)}"
            )
        stored[name] = tensor.dtype
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        on_device = tensor.to(device=device, dtype=dtype, non_blocking=tensor.is_pinned())
        setattr(owner, leaf, nn.Parameter(on_device, requires_grad=False))
    return stored


def release(module: nn.Module) -> None:
    """Send module's parameters back to the meta device, freeing their memory."""
    module.to("meta")


def transformers_renaming(model: nn.Module) -> Callable[[str], str]:
    """The checkpoint-key renaming transformers applies when it loads model (renamings only).

    Converters that merge or split tensors (fused MoE experts) are not one-to-one and are left
    out: such a model fails with "the checkpoint has no tensor for ...". Identity when this
    transformers has no conversion mapping.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings
    except ImportError:
        return lambda key: key
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    return lambda key: apply_renamings(key, renamings)
