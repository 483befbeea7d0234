"""Library messages nobody can act on from the command line, filtered where they arise; `--verbose` shows them.

- transformers' FutureWarning "`is_gradient_checkpointing` is deprecated": raised when PEFT wraps a model
  (peft/peft_model.py reads the old property); neither we nor the user can change that call.
- bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community: ...", logged once, when
  bitsandbytes is imported on a CPU with AVX512-BF16 (bitsandbytes/backends/cpu/ops.py: its fused CPU
  4-bit kernel comes from the Hub through the `kernels` package): dropped where it costs nothing (a
  conversion, a GPU); where 4-bit layers are about to run on the CPU, NOTE_CPU_KERNEL says once what it
  costs and how to get the kernel.
- bitsandbytes' "MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16 during quantization",
  logged at every int8 matmul of a bf16 model (eval's int8 row): the dtype is eval's choice, not the user's.

Importing this module costs nothing (no torch, no libraries), so the CLI can enter quiet_libraries()
before they load.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

IGNORED_WARNINGS: list[tuple[type[Warning], str]] = [
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
]
BNB_CPU_OPS = "bitsandbytes.backends.cpu.ops"  # its module logger too
BNB_KERNEL_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
DROPPED_LOGS: list[tuple[str, str]] = [  # (logger, start of the message)
    (BNB_CPU_OPS, BNB_KERNEL_MESSAGE),
    ("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast from"),
]
NOTE_CPU_KERNEL = ("4-bit layers in eval mode run on bitsandbytes' slower built-in CPU kernel ({reason}); "
                   "for the fast one: pip install kernels (it downloads kernels-community/quantization-bitsandbytes "
                   "from the Hub on first use)")

log = logging.getLogger(__name__)
_verbose: ContextVar[bool] = ContextVar("quailora_verbose_libraries", default=False)
_noted: list[bool] = []  # NOTE_CPU_KERNEL said in this process


@contextmanager
def quiet_libraries(verbose: bool | None = None, *, runs_4bit_on_cpu: bool = False) -> Iterator[None]:
    """Within: the known messages above are filtered; with verbose=True they are shown as the libraries wrote them.

    verbose=None keeps the enclosing setting (the CLI's --verbose), so library code can wrap the calls that
    raise these messages without knowing about the flag. runs_4bit_on_cpu: the caller is about to run
    4-bit layers, on the CPU when there is no GPU; NOTE_CPU_KERNEL is logged if bitsandbytes' fast CPU kernel
    is missing. Not thread-safe (warnings.catch_warnings).
    """
    verbose = _verbose.get() if verbose is None else verbose
    token = _verbose.set(verbose)
    logger = logging.getLogger(BNB_CPU_OPS)  # created before bitsandbytes imports it: the same object
    level = logger.level
    drops = [(logging.getLogger(name), _Drop(start)) for name, start in DROPPED_LOGS]  # nested contexts: their own
    try:
        with warnings.catch_warnings():
            if not verbose:
                for category, message in IGNORED_WARNINGS:
                    warnings.filterwarnings("ignore", message=message, category=category)
                for dropping, drop in drops:
                    dropping.addFilter(drop)
            # That logger logs nothing else: with --verbose its message shows even where a caller silenced
            # the whole "bitsandbytes" tree (the CLI's progress display does).
            logger.setLevel(logging.WARNING)
            if runs_4bit_on_cpu and not verbose:
                _note_missing_cpu_kernel()
            yield
    finally:
        for dropping, drop in drops:
            dropping.removeFilter(drop)
        logger.setLevel(level)
        _verbose.reset(token)


def missing_cpu_kernel() -> bool:
    """Whether 4-bit layers in eval mode run here on bitsandbytes' built-in CPU kernel for want of the fast one.

    Imports bitsandbytes (its import decides and logs it); False where it has no such path (no AVX512-BF16).
    """
    import bitsandbytes  # noqa: F401

    ops = sys.modules.get(BNB_CPU_OPS)
    return ops is not None and hasattr(ops, "gemm_4bit_forward_kernel") and ops.gemm_4bit_forward_kernel is None


class _Drop(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def _note_missing_cpu_kernel() -> None:
    import torch

    if _noted or torch.cuda.is_available() or not missing_cpu_kernel():
        return
    _noted.append(True)
    if importlib.util.find_spec("kernels") is None:
        reason = "the package `kernels` is not installed"
    else:
        reason = "`kernels` could not load it: --verbose shows why"
    log.warning(NOTE_CPU_KERNEL.format(reason=reason))
