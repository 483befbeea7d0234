"""Refusals before any heavy work: a rank no module can hold, a disk without room for the run; a --seq-len
beyond the model's positions clamped with a warning."""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from torch import nn

from ..bundle.layout import INIT_ADAPTER_CONFIG, position_limit
from ..calibration.batches import CalibrationBatch, position_count
from ..core.lora import rank_patterns
from ..core.quantize import Quantizer
from ..errors import BadInputError
from ..events import Listener, Status
from .plan import bundle_bytes, stored_dtype_of, work_bytes
from .settings import ConvertSettings
from .work_folder import WorkFolder


def check_rank(s: ConvertSettings, shapes: dict[str, tuple[int, int]], on_event: Listener) -> None:
    """Refuse a rank no targeted module can hold; name the modules whose adapters get a smaller one."""
    largest = max(min(shape) for shape in shapes.values())
    if s.rank > largest:
        raise BadInputError(f"--rank {s.rank} exceeds every targeted module (the largest holds rank {largest}); "
                            f"use --rank {largest} or less")
    ranks, _ = rank_patterns(shapes, s.rank, s.lora_alpha, s.use_rslora)
    if ranks:
        listed = ", ".join(f"{key} (rank {r})" for key, r in list(ranks.items())[:4])
        more = f" and {len(ranks) - 4} more" if len(ranks) > 4 else ""
        on_event(Status(f"warning: --rank {s.rank} exceeds the size of {listed}{more}: their adapters get that "
                        f"rank with the same scaling ({INIT_ADAPTER_CONFIG} rank_pattern / alpha_pattern)"))


def check_disk(s: ConvertSettings, model: nn.Module, layers_path: str, quantizer: Quantizer, shapes: dict,
                source_folder: Path, batches: list[CalibrationBatch], work: WorkFolder) -> None:
    """Before any heavy work: room for the bundle and the work folder (both beside --out)."""
    needed = bundle_bytes(model, layers_path, quantizer, shapes, s.rank, stored_dtype_of(source_folder), source_folder,
                          s.max_shard_bytes)
    needed += work_bytes(position_count(batches), model.config.hidden_size)
    free = shutil.disk_usage(work.path).free
    if needed > free:
        raise BadInputError(f"not enough disk space in {work.path.parent}: the bundle and its work folder need "
                            f"~{needed:,} bytes ({needed / 2**30:.2f} GiB), {free:,} are free; free some space or "
                            "choose an --out on another disk")


# config.json keys that bound the positions a model holds, as architectures name them (first found wins):
# learned position embeddings (GPT-2's n_positions, OPT's max_position_embeddings) or the trained context (RoPE)
def clamp_seq_len(s: ConvertSettings, config, on_event: Listener) -> ConvertSettings:
    """s with --seq-len at most the model's positions (a warning when it was beyond): a learned position table
    has no row past its end, and a RoPE model was never trained there. Convert, the plan and the resume
    fingerprint all see the clamped value, so the same command resumes."""
    limit = position_limit(config)
    if limit is None or s.seq_len <= limit[0]:
        return s
    positions, key = limit
    on_event(Status(f"warning: --seq-len {s.seq_len} exceeds the {positions} positions of the model (config.json "
                    f"{key}); calibrating on samples of at most {positions} tokens"))
    return replace(s, seq_len=positions)
