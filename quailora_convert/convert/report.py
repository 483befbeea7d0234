"""quailora_report.json: per module the calibrated error before and after, plus settings, versions, timings."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from .. import __version__
from ..calibration.batches import CalibrationBatch, sample_count, token_count
from ..core.joint import Compensated
from ..core.quantize import Quantizer
from ..core.solvers import calibrated_error, top_singular
from ..core.value_range import largest_abs
from ..sources.resolve import ModelSource
from .settings import RUN_ONLY_SETTINGS, ConvertSettings


BASELINE_POWER = 2  # the baseline is a comparison, not an output: a few percent from the optimum is fine


@dataclass
class ModuleReport:
    module: str
    shape: tuple[int, int]  # (out, in)
    input_group: str  # the module whose input H was accumulated on (q/k/v share one)
    error_before: float  # ||E X||^2 / n of the stored base, without adapter
    error_svd_init: float | None  # with the rank-r SVD of E (weight-space init); None without --report-baseline
    error_after: float  # with the solver's correction
    ridge: float  # added to H's diagonal for the solve, relative to its mean (--damp, more if H needed it)
    error_nearest: float  # of bitsandbytes' round-to-nearest base, without adapter (= error_before for it)
    refine_errors: list[float]  # with adapter: the first solve, then each --refine round
    kept_round: int  # the round stored (the lowest error)
    calibrated_scale_rows: int = 0  # rows stored on block scales searched under H (--scales calibrated); 0: absmax
    # The largest |value| the loaded module computes with, which its compute dtype must hold (convert.compute_dtype):
    weight_max_abs: float = 0.0  # of the stored base dequantized (= its largest absmax scale)
    input_max_abs: float = 0.0  # of its calibration inputs
    output_max_abs: float = 0.0  # of its calibration outputs


def module_report(module: str, input_group: str, result: Compensated, H: Tensor,
                  baseline: bool = False, input_max_abs: float = 0.0, output_max_abs: float = 0.0) -> ModuleReport:
    """The calibrated error of one linear without adapter, with the solver's correction, and with baseline
    the weight-space baseline's (the rank-r truncated SVD of E, computed for this report: exact for small
    matrices, else randomized with BASELINE_POWER power iterations). input/output_max_abs: of the calibration
    activations (capture.InputHessians)."""
    E, correction = result.error, result.correction
    return ModuleReport(
        module=module, shape=tuple(E.shape), input_group=input_group,
        error_before=result.error_rounded,
        error_svd_init=_baseline_error(E, correction.left.shape[1], H, result.error_rounded) if baseline else None,
        error_after=result.objective_rounds[result.kept_round],
        ridge=correction.ridge,
        error_nearest=result.error_nearest,
        refine_errors=result.objective_rounds,
        kept_round=result.kept_round,
        calibrated_scale_rows=result.calibrated_scale_rows,
        weight_max_abs=largest_abs(result.quantized.dequantized),
        input_max_abs=input_max_abs,
        output_max_abs=output_max_abs,
    )


def _baseline_error(E: Tensor, rank: int, H: Tensor, error_E: float) -> float:
    """tr((E - M) H (E - M)^T) for the weight-space init M = P E, P = U U^T the projection onto E's top r
    left singular directions: tr(E H E^T) - tr(Y H Y^T) with Y = U^T E (r, in), an r x in x in product.

    U is found in float32 (E's own precision), which costs 0.55-0.8x the float64 search on SmolLM2's shapes;
    the baseline moves by under 3e-7 relative. Y and its error are float64."""
    U, _, _ = top_singular(E.float(), rank, max_power=BASELINE_POWER, fallback=False)
    return error_E - calibrated_error(U.double().T @ E.double(), H)


def conversion_report(s: ConvertSettings, source: ModelSource, quantizer: Quantizer, modules: list[ModuleReport],
                      batches: list[CalibrationBatch], rank_shares: list[dict], calibration_dtype: str,
                      calibration_seconds: float,
                      layer_seconds: list[float],
                      phase_seconds: dict[str, float], started: float, dropped_keys: list[str],
                      source_fingerprint: dict | None = None) -> dict:
    """source_fingerprint: the work folder's fingerprint of the source ({"files": ...} of a local one, or its
    repo id and commit), recorded so that `eval` can tell the same model from another at the same path."""
    import bitsandbytes
    import peft
    import transformers

    nearest = sum(r.error_nearest for r in modules)  # plain bitsandbytes: what "relative" compares against
    before = sum(r.error_before for r in modules)
    after = sum(r.error_after for r in modules)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()
                if k not in RUN_ONLY_SETTINGS}
    return {
        "quailora_convert": __version__,
        "source": recorded_source(s.model, source, source_fingerprint),
        "quantization": {"bits": quantizer.bits, "type": quantizer.name},
        "settings": settings,
        "calibration": {"samples": sample_count(batches), "tokens": token_count(batches),
                        "dtype": calibration_dtype,  # of the forward that produced X (H: float32 sums)
                        "world_size": len(rank_shares),
                        "ranks": rank_shares},  # per process (torchrun): {rank, samples, tokens} it calibrated on
        "summary": {"modules": len(modules), "error_nearest": nearest, "error_before": before, "error_after": after,
                    "relative_error_after": after / nearest if nearest else None},
        "modules": [asdict(r) for r in modules],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "bitsandbytes": bitsandbytes.__version__, "peft": peft.__version__},
        "timings": _timings(calibration_seconds, layer_seconds, phase_seconds, time.perf_counter() - started),
        "peak_rss_bytes": _peak_rss_bytes(),
        "dropped_checkpoint_keys": dropped_keys,
    }


def recorded_source(model: str, source: ModelSource, fingerprint: dict | None) -> dict:
    """The source as a later run finds it again from anywhere: "model" is the Hub id (with "commit"), the .gguf
    file or the folder as an absolute path; "given" is MODEL as typed."""
    if source.repo_id is not None:
        resolved = source.repo_id
    elif source.gguf is not None:
        resolved = source.gguf
    else:
        resolved = str(Path(model).expanduser().resolve())
    return {"model": resolved, "given": model, "repo_id": source.repo_id, "commit": source.commit,
            "gguf": source.gguf, "fingerprint": fingerprint}


def _timings(calibration_seconds: float, layer_seconds: list[float], phase_seconds: dict[str, float],
             total_seconds: float) -> dict:
    """Wall seconds: calibration, each layer, each phase (convert.phases; "other" is the rest of the
    total: opening the source, tokenizing, configs, card), and the total. After --resume the phases
    add up the runs and the total is this run's."""
    phases = dict(phase_seconds)
    phases["other"] = max(total_seconds - sum(phase_seconds.values()), 0.0)
    return {"calibration_seconds": calibration_seconds, "layer_seconds": layer_seconds, "phase_seconds": phases,
            "total_seconds": total_seconds}


def _peak_rss_bytes() -> int:
    import resource  # POSIX only: imported when a report is written, not with the package

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
