"""What a conversion is asked to do: every option and its default, in one place (the CLI reads them here).

Importing this module costs nothing (no torch): the CLI builds its options from it before any command runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..bundle.layout import DEFAULT_MAX_SHARD_BYTES
from ..core.options import DEFAULT_DAMP, DEFAULT_GPTQ_DAMP, LORA_SPLITS, ROUNDINGS, SCALES, SOLVERS
from ..errors import BadInputError

# Seconds between resume points (each writes the next layer's inputs: 48 MB on SmolLM2, 8.6 GB for a 70B model at
# 128 x 2048 tokens): a crash or a stop loses at most about this much work.
DEFAULT_RESUME_INTERVAL = 60.0
# auto: the checkpoint's bfloat16 where the device computes it fast (capture.calibration_dtype), else float32
CALIB_DTYPES = ("auto", "float32", "bfloat16", "float16")
# inputs of the H update H += X^T X (the sums are float32 either way): bfloat16 rounds X to it and multiplies with
# float32 accumulation (core.hessian.add_upper_triangle), which may halve the update's cost on a GPU
HESSIAN_DTYPES = ("float32", "bfloat16")
RUN_ONLY_SETTINGS = ("overwrite", "resume", "resume_interval")  # how a run was started, not what it makes

if TYPE_CHECKING:
    import torch


@dataclass
class ConvertSettings:
    model: str
    out: Path
    calib: str
    calib_split: str | None = None  # Hub datasets: the split (None: train)
    calib_field: str | None = None  # Hub datasets: the text column (None: Alpaca columns or 'text')
    bits: int = 4
    rank: int = 64
    lora_alpha: float = 16.0
    use_rslora: bool = False
    # how M is split into lora_B @ lora_A (M unchanged): balanced, a-kaiming or u (core.lora.to_peft)
    lora_split: str = "balanced"
    solver: str = "exact"
    als_steps: int = 20
    damp: float = DEFAULT_DAMP
    # base codes: bitsandbytes' round-to-nearest, or GPTQ on bnb's scales. nearest is the default: the init that
    # fine-tunes best (README: fine-tuning), 2.6x faster, and a torchrun run's base is byte-identical to one process
    rounding: str = "nearest"
    refine: int = 0  # rounds of re-rounding W - M and re-solving M (the best iterate is kept)
    gptq_damp: float = DEFAULT_GPTQ_DAMP
    # NF4 block scales: absmax (bitsandbytes' own) or calibrated (each block's scale searched under H, core.scales;
    # never a larger base error than absmax; --rounding gptq and --refine then run on the chosen scales)
    scales: str = "absmax"
    # the report's (and card's) weight-space baseline per module: the calibrated error with the rank-r SVD of E
    # (LoftQ-like). Off by default: a comparison, not an output, that costs an SVD per module (5% of SmolLM2's
    # conversion on CPU)
    report_baseline: bool = False
    target_modules: str | list[str] = "all-linear"
    num_samples: int = 128
    seq_len: int = 512
    batch_size: int = 8
    calib_dtype: str = "auto"  # dtype of the calibration forward: auto, float32, bfloat16, float16
    hessian_dtype: str = "float32"  # inputs of the H update: float32, or bfloat16 (float32 accumulation)
    device: str = "auto"
    seed: int = 0
    revision: str | None = None
    overwrite: bool = False  # replace --out, and discard an interrupted run's state
    resume: bool = False  # continue an interrupted run from its last resume point
    resume_interval: float = DEFAULT_RESUME_INTERVAL  # seconds between resume points; 0: after every layer
    allow_pickle: bool = False  # pytorch_model*.bin sources: unpickling can run code
    trust_remote_code: bool = False  # models whose config.json names custom code (auto_map)
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES

    def validate(self) -> None:
        """One BadInputError line for the first option that cannot work (before any model is read)."""
        from ..core.quantize import QUANTIZERS

        if self.solver not in SOLVERS:
            raise BadInputError(f"--solver {self.solver!r}: choose one of {', '.join(SOLVERS)}")
        if self.lora_split not in LORA_SPLITS:
            raise BadInputError(f"--lora-split {self.lora_split!r}: choose one of {', '.join(LORA_SPLITS)}")
        if self.rounding not in ROUNDINGS:
            raise BadInputError(f"--rounding {self.rounding!r}: choose one of {', '.join(ROUNDINGS)}")
        if self.scales not in SCALES:
            raise BadInputError(f"--scales {self.scales!r}: choose one of {', '.join(SCALES)}")
        if self.scales != "absmax" and self.bits != 4:
            raise BadInputError(f"--scales {self.scales} chooses NF4 block scales: it needs --bits 4")
        if self.calib_dtype not in CALIB_DTYPES:
            raise BadInputError(f"--calib-dtype {self.calib_dtype!r}: choose one of {', '.join(CALIB_DTYPES)}")
        if self.hessian_dtype not in HESSIAN_DTYPES:
            raise BadInputError(f"--hessian-dtype {self.hessian_dtype!r}: choose one of {', '.join(HESSIAN_DTYPES)}")
        if self.refine < 0:
            raise BadInputError(f"--refine must be >= 0, got {self.refine}")
        if not self.gptq_damp > 0:
            raise BadInputError(f"--gptq-damp must be positive, got {self.gptq_damp}")
        if self.rank < 1:
            raise BadInputError(f"--rank must be >= 1, got {self.rank}")
        if not self.lora_alpha > 0:
            raise BadInputError(f"--lora-alpha must be positive, got {self.lora_alpha}")
        if self.batch_size < 1 or self.als_steps < 0:
            raise BadInputError("--batch-size must be >= 1 and --als-steps >= 0")
        if self.num_samples < 1 or self.seq_len < 2:
            raise BadInputError("--num-samples must be >= 1 and --seq-len >= 2")
        if self.bits not in QUANTIZERS:
            raise BadInputError(f"--bits must be 4 (NF4) or 8 (int8), got {self.bits}")
        if self.max_shard_bytes < 1:
            raise BadInputError(f"--max-shard-bytes must be >= 1, got {self.max_shard_bytes}")
        if not self.resume_interval >= 0:
            raise BadInputError(f"--resume-interval must be >= 0 seconds, got {self.resume_interval}")
        if self.resume and self.overwrite:
            raise BadInputError("--resume continues an interrupted run and --overwrite discards it: pass one of them")
        resolve_device(self.device)


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise BadInputError(f"--device {name!r} is not a device (auto, cpu, cuda:0, ...)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"--device {name}: no CUDA device is available; use --device cpu")
    return device
