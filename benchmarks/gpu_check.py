"""One prepared command for a GPU's first minutes: convert a real-shaped model and say where the time goes.

In one process tree (each step a child process, so each one's peak memory is its own):
1. a random-weight checkpoint of the shape (synthetic.py; kept in OUT/source and reused by a rerun), and one
   plain-text calibration document of its vocabulary's words (or --calib); the conversion's --dry-run plan
   (its estimates of memory and seconds, and where the activations wait), to compare with what the run takes;
2. the conversion through the quailora-convert console script, as a user runs it (defaults, --rank);
3. a bare forward in the calibration dtype over the same batches (speed.py's time_forward_pass), and the
   floor, one forward plus the H update as speed.py's time_floor runs it, with the H update's inputs in
   float32 and in bfloat16 (--hessian-dtype);
4. one exact solve at --solve-shape (solve.py's run_shape; 8192 x 28672: Llama-2-70B's down_proj);
5. the bundle loaded with plain transformers (the base, then its adapter from quailora_init/ with PEFT) on the
   device (CPU: in train mode under no_grad, see README) and one batch's logits checked finite;
6. the conversion again with --hessian-dtype bfloat16: its time and calibrated error against step 2's.
OUT/gpu_check.json is rewritten after every step (a run cut short keeps what it measured); the table is printed
at the end. Peak GPU memory (torch.cuda.max_memory_allocated) and peak host RSS of each child are written at
its exit by a sitecustomize module put on its PYTHONPATH (the console script runs unmodified).

    python benchmarks/gpu_check.py --out /tmp/gpu-check            # Llama-2-7B shape, 128 x 2048 tokens, r64
    python benchmarks/gpu_check.py --out /tmp/gpu-check --tiny     # a tiny shape, any device (CI: CPU)
    python benchmarks/gpu_check.py --out /tmp/gpu-check --preset llama-3-8b
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))

from workplace import console_script  # noqa: E402

PEAK_ENV = "QUAILORA_GPU_CHECK_PEAK"
# Written into OUT/probe/sitecustomize.py: every child process that imports it reports its peaks at exit.
PROBE = f'''"""gpu_check.py's probe: at exit, this process's peak host RSS and (if it used CUDA) peak GPU memory."""
import atexit, json, os, resource, sys


def _report():
    peak = {{"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["max_memory_allocated"] = max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count()))
        peak["max_memory_reserved"] = max(torch.cuda.max_memory_reserved(d) for d in range(torch.cuda.device_count()))
    with open(os.environ["{PEAK_ENV}"], "w") as f:
        json.dump(peak, f)


if os.environ.get("{PEAK_ENV}"):
    atexit.register(_report)
'''
FULL = dict(preset="llama-2-7b", num_samples=128, seq_len=2048, batch_size=8, rank=64, solve_shape="8192x28672")
TINY = dict(preset="tiny", num_samples=16, seq_len=64, batch_size=4, rank=8, solve_shape="256x512")


class Check:
    """The run's folder, its settings and its results (rewritten to OUT/gpu_check.json after every step)."""

    def __init__(self, args):
        self.args = args
        self.out: Path = args.out
        self.probe = self.out / "probe"
        self.results: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                           if not k.endswith("_child")}}

    def save(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=2) + "\n")

    def child(self, name: str, command: list[str]) -> dict:
        """Run command with the probe; {"wall_seconds", "peak": {...}, "stdout_json": last stdout line's JSON}."""
        peak_file = self.probe / f"{name}.json"
        peak_file.unlink(missing_ok=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(self.probe),
                                                                         os.environ.get("PYTHONPATH")])))
        env[PEAK_ENV] = str(peak_file)
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - started
        if done.returncode:
            self.results.setdefault("failed", {})[name] = done.stderr[-3000:]
            self.save()
            raise SystemExit(f"{name} failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
        text = done.stdout.strip()
        lines = text.splitlines()
        parsed = (json.loads(text) if text.startswith("{") and text.endswith("}") and len(lines) > 1
                  else json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None)
        peak = json.loads(peak_file.read_text()) if peak_file.is_file() else {}
        return {"wall_seconds": wall, "peak": peak, "stdout_json": parsed}

    def step(self, name: str, command: list[str]) -> dict:
        result = self.child(name, command)
        self.results[name] = {"wall_seconds": result["wall_seconds"], "peak": result["peak"],
                              **(result["stdout_json"] or {})}
        self.save()
        return self.results[name]


def resolve_device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def versions(device: str) -> dict:
    import bitsandbytes
    import peft
    import torch
    import transformers

    found = {"torch": torch.__version__, "cuda": torch.version.cuda, "bitsandbytes": bitsandbytes.__version__,
             "transformers": transformers.__version__, "peft": peft.__version__}
    found["device_name"] = torch.cuda.get_device_name(device) if device.startswith("cuda") else _cpu_name()
    return found


def _cpu_name() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def prepare_source(check: Check) -> Path:
    """OUT/source: the synthetic checkpoint (reused when a finished one of the same preset and layers is there)."""
    args = check.args
    source = check.out / "source"
    marker = check.out / "source.json"
    wanted = {"preset": args.preset, "layers": args.layers, "seed": 0}
    if marker.is_file() and json.loads(marker.read_text()) == wanted and (source / "config.json").is_file():
        check.results["synthetic"] = {"reused": True}
    else:
        if source.exists():
            raise SystemExit(f"{source} holds another or an unfinished checkpoint: remove it, or choose another --out")
        command = [sys.executable, str(BENCHMARKS / "synthetic.py"), "--preset", args.preset, "--out", str(source),
                   "--device", args.device]
        if args.layers is not None:
            command += ["--layers", str(args.layers)]
        check.step("synthetic", command)
        marker.write_text(json.dumps(wanted))
    check.results["source_bytes"] = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    return source


def prepare_calibration(check: Check) -> Path:
    import synthetic

    args = check.args
    if args.calib is not None:
        return args.calib
    path = check.out / "calibration.txt"
    preset = synthetic.preset_with_layers(args.preset, args.layers)
    return synthetic.calibration_text(preset, path, words=args.num_samples * args.seq_len * 11 // 10)


def conversion_command(check: Check, source: Path, calib: Path, bundle: Path, *extra: str) -> list[str]:
    a = check.args
    return [console_script(), str(source), "--calib", str(calib), "--out", str(bundle), "--overwrite",
            "--num-samples", str(a.num_samples), "--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size),
            "--rank", str(a.rank), "--device", a.device, "--quiet", *extra]


def convert(check: Check, name: str, source: Path, calib: Path, bundle: Path, *extra: str) -> dict:
    from quailora_convert.bundle.layout import REPORT

    result = check.child(name, conversion_command(check, source, calib, bundle, *extra))
    report = json.loads((bundle / REPORT).read_text())
    summary = {"wall_seconds": result["wall_seconds"], "peak": result["peak"],
               "report_total_seconds": report["timings"]["total_seconds"],
               "phase_seconds": report["timings"]["phase_seconds"],
               "calibration_dtype": report["calibration"]["dtype"], "tokens": report["calibration"]["tokens"],
               "error_after": report["summary"]["error_after"], "error_nearest": report["summary"]["error_nearest"],
               "relative_error_after": report["summary"]["relative_error_after"],
               "report_peak_rss_bytes": report.get("peak_rss_bytes")}
    check.results[name] = summary
    check.save()
    return summary


def _own_command(check: Check, flag: str, *extra: str) -> list[str]:
    a = check.args
    return [sys.executable, str(Path(__file__).resolve()), flag, "--out", str(a.out), "--device", a.device,
            "--num-samples", str(a.num_samples), "--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size),
            *extra]


def measure_child(args) -> None:
    """The bare forward (decoder, calibration dtype) and the floor with float32 and bfloat16 H inputs."""
    import torch
    from transformers import AutoModelForCausalLM

    import speed
    from quailora_convert.calibration.batches import position_count, token_count
    from quailora_convert.convert.allocator import serve_large_blocks_from_mmap
    from quailora_convert.convert.capture import calibration_dtype
    from quailora_convert.convert.plan import stored_dtype_of

    serve_large_blocks_from_mmap()  # as cli/convert.py does before a conversion
    device = torch.device(args.device)
    dtype = calibration_dtype("auto", stored_dtype_of(args.model), device)
    batches, _ = speed._batches(args)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    result = {"calibration_dtype": str(dtype).removeprefix("torch."), "tokens": token_count(batches),
              "padded_tokens": position_count(batches),
              "forward_seconds": speed.time_forward_pass(model.model, batches, device)}
    for hessian_dtype in (torch.float32, torch.bfloat16):
        floor = speed.time_floor(model, batches, device, dtype, hessian_dtype)
        result[f"floor_{str(hessian_dtype).removeprefix('torch.')}"] = floor
    print(json.dumps(result))


def solve_child(args) -> None:
    import torch

    import solve

    out_features, in_features = (int(v) for v in args.solve_shape.lower().split("x"))
    print(json.dumps(solve.run_shape(out_features, in_features, args.rank, torch.device(args.device), old_max_in=0)))


def load_child(args) -> None:
    """The bundle as a user loads it: plain transformers for the base, PEFT for the adapter in quailora_init/."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import speed
    from quailora_convert.bundle.layout import INIT_ADAPTER_DIR

    device = torch.device(args.device)
    bundle = Path(args.bundle)
    placed = {"device_map": {"": str(device)}} if device.type == "cuda" else {}
    model = AutoModelForCausalLM.from_pretrained(bundle, dtype=torch.float32, **placed)
    with_adapter = (bundle / INIT_ADAPTER_DIR).is_dir()
    if with_adapter:
        model = PeftModel.from_pretrained(model, bundle, subfolder=INIT_ADAPTER_DIR)
    model.train()  # CPU: an eval-mode 4-bit forward may repack the weights (README); dropout is 0
    batch = speed._batches(args)[0][0]
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
    print(json.dumps({"with_adapter": with_adapter, "logits_finite": bool(torch.isfinite(logits).all()),
                      "logits_shape": list(logits.shape), "logits_std": float(logits.float().std())}))


def run(args) -> dict:
    check = Check(args)
    check.out.mkdir(parents=True, exist_ok=True)
    check.probe.mkdir(exist_ok=True)
    (check.probe / "sitecustomize.py").write_text(PROBE)
    started = time.perf_counter()
    check.results["versions"] = versions(args.device)
    check.save()
    source = prepare_source(check)
    calib = prepare_calibration(check)
    bundle = check.out / "bundle"
    check.step("plan", conversion_command(check, source, calib, bundle, "--dry-run", "--json"))
    conversion = convert(check, "conversion", source, calib, bundle)
    child_args = ["--model", str(source), "--calib", str(calib)]
    measured = check.step("measure", _own_command(check, "--measure-child", *child_args))
    check.step("solve", _own_command(check, "--solve-child", "--rank", str(args.rank),
                                     "--solve-shape", args.solve_shape))
    loaded = check.step("load", _own_command(check, "--load-child", *child_args, "--bundle", str(bundle)))
    if not loaded["logits_finite"]:
        check.results["failed"] = {"load": "the bundle's logits are not finite"}
    if not args.skip_bf16_conversion:
        convert(check, "conversion_bf16_hessian", source, calib, check.out / "bundle-bf16-hessian",
                "--hessian-dtype", "bfloat16")
    check.results["summary"] = summarize(check.results, conversion, measured)
    check.results["total_seconds"] = time.perf_counter() - started
    check.save()
    return check.results


def summarize(results: dict, conversion: dict, measured: dict) -> dict:
    """The headline numbers: ratios are plain quotients of the measured seconds."""
    floor = measured["floor_float32"]["floor_seconds"]
    forward = measured["forward_seconds"]
    peaks = [r["peak"] for r in results.values() if isinstance(r, dict) and "peak" in r]
    summary = {"conversion_wall_seconds": conversion["wall_seconds"], "forward_seconds": forward,
               "floor_seconds": floor, "floor_bf16_hessian_seconds": measured["floor_bfloat16"]["floor_seconds"],
               "ratio_to_forward": conversion["wall_seconds"] / forward,
               "ratio_to_floor": conversion["wall_seconds"] / floor,
               "calibrated_error": conversion["error_after"],
               "conversion_peak_gpu_bytes": conversion["peak"].get("max_memory_allocated"),
               "conversion_peak_rss_bytes": conversion["peak"].get("max_rss_bytes"),
               "peak_gpu_bytes": max((p.get("max_memory_allocated", 0) for p in peaks), default=0),
               "peak_rss_bytes": max((p.get("max_rss_bytes", 0) for p in peaks), default=0),
               "solve_seconds": results["solve"]["factor_seconds"] + results["solve"]["solve_seconds"],
               "logits_finite": results["load"]["logits_finite"],
               "planned_seconds": results["plan"]["seconds"],
               "planned_peak_host_bytes": results["plan"]["peak_host_bytes"],
               "planned_peak_device_bytes": results["plan"]["peak_device_bytes"],
               "activations_on": results["plan"].get("activations_on")}
    bf16 = results.get("conversion_bf16_hessian")
    if bf16:
        summary["bf16_hessian_wall_seconds"] = bf16["wall_seconds"]
        summary["bf16_hessian_calibrated_error"] = bf16["error_after"]
        summary["bf16_hessian_relative_error_difference"] = bf16["error_after"] / conversion["error_after"] - 1
    return summary


def _gib(n) -> str:
    return "-" if not n else f"{n / 2 ** 30:.2f} GiB"


def print_table(results: dict) -> None:
    s, v, c = results["summary"], results["versions"], results["conversion"]
    rows = [("device", v["device_name"]),
            ("versions", f"torch {v['torch']}, CUDA {v['cuda']}, bitsandbytes {v['bitsandbytes']}, "
                         f"transformers {v['transformers']}, peft {v['peft']}"),
            ("shape", f"{results['settings']['preset']}" + (f" ({results['settings']['layers']} layers)"
                                                            if results['settings']['layers'] else "")
             + f", {results['source_bytes'] / 1e9:.2f} GB bf16; {c['tokens']} tokens, calibration in "
               f"{c['calibration_dtype']}"),
            ("conversion wall", f"{s['conversion_wall_seconds']:.1f} s"),
            ("per phase", ", ".join(f"{k} {t:.2f}" for k, t in c["phase_seconds"].items()) + " s"),
            ("bare forward", f"{s['forward_seconds']:.2f} s (ratio {s['ratio_to_forward']:.2f}x)"),
            ("floor (forward + H)", f"{s['floor_seconds']:.2f} s (ratio {s['ratio_to_floor']:.2f}x); "
                                    f"with bf16 H inputs {s['floor_bf16_hessian_seconds']:.2f} s"),
            ("solve " + results["settings"]["solve_shape"], f"{s['solve_seconds']:.2f} s"),
            ("peak GPU memory", f"conversion {_gib(s['conversion_peak_gpu_bytes'])}, any step "
                                f"{_gib(s['peak_gpu_bytes'])}"),
            ("peak host RSS", f"conversion {_gib(s['conversion_peak_rss_bytes'])}, any step "
                              f"{_gib(s['peak_rss_bytes'])}"),
            ("dry-run plan", f"{s['planned_seconds']:.0f} s, host {_gib(s['planned_peak_host_bytes'])}, device "
                             f"{_gib(s['planned_peak_device_bytes'])}, activations on the {s['activations_on']}"),
            ("calibrated error", f"{s['calibrated_error']:.6g} (relative to plain NF4 "
                                 f"{c['relative_error_after']:.4f})"),
            ("bundle loads", f"logits finite: {s['logits_finite']}")]
    if "bf16_hessian_wall_seconds" in s:
        rows.append(("--hessian-dtype bfloat16", f"{s['bf16_hessian_wall_seconds']:.1f} s, calibrated error "
                                                 f"{s['bf16_hessian_relative_error_difference']:+.2e} relative"))
    print("| measure | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the checkpoint, bundles and gpu_check.json")
    p.add_argument("--tiny", action="store_true", help="a tiny shape (16 x 64 tokens, r8): any device, CI")
    p.add_argument("--preset", help="synthetic.py preset (default llama-2-7b; tiny with --tiny)")
    p.add_argument("--layers", type=int, help="only the first N decoder layers of the preset")
    p.add_argument("--calib", type=Path, help="a calibration file instead of synthetic words")
    p.add_argument("--num-samples", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--rank", type=int)
    p.add_argument("--solve-shape", help="OUTxIN of the solve (default 8192x28672; 256x512 with --tiny)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--skip-bf16-conversion", action="store_true", help="do not convert again with bf16 H inputs")
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    for flag in ("--measure-child", "--solve-child", "--load-child"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    for name, value in (TINY if args.tiny else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.device = resolve_device(args.device)
    for child, flag in ((measure_child, args.measure_child), (solve_child, args.solve_child),
                        (load_child, args.load_child)):
        if flag:
            child(args)
            return 0
    results = run(args)
    print_table(results)
    return 1 if results.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
