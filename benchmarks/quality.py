"""Held-out perplexity of QuAILoRA bundles against plain NF4 (QLoRA), bnb int8 and the source.

Held-out text: --records records of an Alpaca file (default ../shared/data/calib/code_alpaca_2k.json),
chosen with random.Random(--seed), formatted with quailora_convert.calibration.formats.format_alpaca,
truncated to --max-len tokens. Perplexity is token level: exp(sum NLL / predicted tokens), padding
excluded. Every model is evaluated in eval mode under torch.no_grad() with bf16 as the load dtype
(the source is stored in bf16 and the bundles' compute dtype is bf16), so all rows share one setting.

Rows: the source (bf16); plain NF4 = a bundle's base with the adapter disabled (identical across
bundles built with the same --bits; checked by hashing the base shards); each bundle with its
adapter; the source quantized by transformers' BitsAndBytesConfig(load_in_8bit=True).
"fraction of the NF4->int8 gap closed" = (ppl_plain_nf4 - ppl_bundle) / (ppl_plain_nf4 - ppl_int8).

    # build rank 16/64 x exact/als bundles from SmolLM2-135M-Instruct, then evaluate everything
    python benchmarks/quality.py --build-dir /tmp/qbundles --ranks 16 64 --solvers exact als --json /tmp/quality.json
    # evaluate bundles that already exist
    python benchmarks/quality.py --bundles /tmp/qbundles/r16-exact /tmp/qbundles/r64-exact --json /tmp/q.json

Bundles already present in --build-dir are reused (their report gives wall time and peak RSS).
Results are written to --json after every model, and rows already in it are reused with --resume.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from quailora_convert.bundle.layout import REPORT

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULT_SOURCE = Path.home() / ".cache" / "quailora-test-models" / "smollm2-135m-instruct"
DEFAULT_CALIB = SHARED / "data" / "calib" / "self_instruct_alpaca.jsonl"
DEFAULT_HELDOUT = SHARED / "data" / "calib" / "code_alpaca_2k.json"
MiB = 1 << 20


# -- building bundles -----------------------------------------------------------------------------
def build_bundle(source: Path, out: Path, rank: int, solver: str, args) -> dict:
    """Convert in a child process (the CLI); wall time and that child's peak RSS via os.wait4."""
    if (out / REPORT).exists():
        report = json.loads((out / REPORT).read_text())
        print(f"reusing {out}", flush=True)
        return {"wall_seconds": report["timings"]["total_seconds"], "peak_rss_bytes": report["peak_rss_bytes"],
                "built_now": False}
    exe = shutil.which("quailora-convert") or "quailora-convert"
    cmd = [exe, str(source), "--calib", str(args.calib), "--out", str(out), "--bits", str(args.bits),
           "--rank", str(rank), "--solver", solver, "--num-samples", str(args.num_samples),
           "--seq-len", str(args.seq_len), "--device", "cpu"]
    print("$ " + " ".join(cmd), flush=True)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"conversion to {out} failed with exit code {code}")
    return {"wall_seconds": time.perf_counter() - started, "peak_rss_bytes": usage.ru_maxrss * 1024, "built_now": True}


def bundle_summary(bundle: Path) -> dict:
    report = json.loads((bundle / REPORT).read_text())
    s = report["settings"]
    modules = {m["module"]: m for m in report["modules"]}
    q0 = next((m for name, m in modules.items() if name.endswith("layers.0.self_attn.q_proj")), None)
    out = {"rank": s["rank"], "solver": s["solver"], "bits": s["bits"], "num_samples": s["num_samples"],
           "seq_len": s["seq_len"], "relative_error_after": report["summary"]["relative_error_after"],
           "error_before": report["summary"]["error_before"], "error_after": report["summary"]["error_after"],
           "report_total_seconds": report["timings"]["total_seconds"],
           "report_peak_rss_bytes": report["peak_rss_bytes"]}
    if q0:
        out["layer0_q_proj"] = {"error_before": q0["error_before"], "error_svd_init": q0["error_svd_init"],
                                "error_after": q0["error_after"],
                                "svd_init_over_before": q0["error_svd_init"] / q0["error_before"],
                                "after_over_before": q0["error_after"] / q0["error_before"]}
    return out


def base_fingerprint(bundle: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(bundle.glob("model*.safetensors")):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(16 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


# -- perplexity -----------------------------------------------------------------------------------
def heldout_sequences(tokenizer, path: Path, records: int, seed: int, max_len: int) -> list[list[int]]:
    from quailora_convert.calibration.formats import format_alpaca

    data = json.loads(path.read_text())
    chosen = random.Random(seed).sample(range(len(data)), min(records, len(data)))
    texts = [format_alpaca(data[i]) for i in chosen]
    return [ids for ids in (tokenizer(t, truncation=True, max_length=max_len)["input_ids"] for t in texts) if len(ids) >= 2]


def perplexity(model, sequences: list[list[int]], batch_size: int, pad_id: int) -> dict:
    """The library's perplexity (quailora_convert.evaluate), under this script's key names."""
    from quailora_convert.evaluate import perplexity as measure

    result = measure(model, sequences, batch_size, pad_id)
    return {"ppl": result["perplexity"], "nll_sum": result["nll_sum"], "tokens": result["tokens"],
            "eval_seconds": result["seconds"]}


def evaluate(name: str, loader, sequences, args, pad_id, results: dict, json_path: Path | None, context=None) -> dict:
    if name in results["models"] and args.resume:
        print(f"{name}: reusing ppl {results['models'][name]['ppl']:.4f}", flush=True)
        return results["models"][name]
    model = loader()
    with (context(model) if context else nullcontext()):
        row = perplexity(model, sequences, args.batch_size, pad_id)
    row["dtype"] = str(next(p.dtype for p in model.parameters() if p.is_floating_point()))
    results["models"][name] = row
    print(f"{name}: ppl {row['ppl']:.4f} over {row['tokens']} tokens ({row['eval_seconds']:.0f}s)", flush=True)
    del model
    gc.collect()
    if json_path:
        json_path.write_text(json.dumps(results, indent=2))
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    p.add_argument("--bundles", type=Path, nargs="*", default=[], help="existing bundles to evaluate")
    p.add_argument("--build-dir", type=Path, help="build (or reuse) r{rank}-{solver} bundles here")
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    p.add_argument("--solvers", nargs="+", default=["exact", "als"])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--calib", type=Path, default=DEFAULT_CALIB)
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--build-only", action="store_true")
    p.add_argument("--heldout", type=Path, default=DEFAULT_HELDOUT)
    p.add_argument("--records", type=int, default=200)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--skip", nargs="*", default=[], choices=["source", "int8"], help="rows to leave out")
    p.add_argument("--json", type=Path)
    p.add_argument("--resume", action="store_true", help="reuse rows already in --json")
    args = p.parse_args()

    results = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "builds": {}, "bundles": {}, "models": {}}
    if args.resume and args.json and args.json.exists():
        old = json.loads(args.json.read_text())
        results["models"] = old.get("models", {})
        results["builds"] = old.get("builds", {})

    bundles = list(args.bundles)
    if args.build_dir:
        for rank in args.ranks:
            for solver in args.solvers:
                out = args.build_dir / f"r{rank}-{solver}"
                build = build_bundle(args.source, out, rank, solver, args)
                if build["built_now"] or str(out) not in results["builds"]:
                    results["builds"][str(out)] = build
                bundles.append(out)
                if args.json:
                    args.json.write_text(json.dumps(results, indent=2))
    if not bundles and not args.build_only:
        print("no bundles: give --bundles or --build-dir", file=sys.stderr)
    for bundle in bundles:
        results["bundles"][str(bundle)] = {**bundle_summary(bundle), "base_sha256_16": base_fingerprint(bundle),
                                           **results["builds"].get(str(bundle), {})}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.build_only:
        print_tables(results, args)
        return 0

    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from quailora_convert.calibration.batches import pad_token_id

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.source)
    pad_id = pad_token_id(tokenizer)
    sequences = heldout_sequences(tokenizer, args.heldout, args.records, args.seed, args.max_len)
    results["heldout"] = {"file": str(args.heldout), "records": len(sequences),
                          "tokens": sum(len(s) for s in sequences)}
    print(f"held-out: {len(sequences)} records, {results['heldout']['tokens']} tokens", flush=True)
    dtype = torch.bfloat16

    if "source" not in args.skip:
        evaluate("source (bf16)", lambda: AutoModelForCausalLM.from_pretrained(args.source, dtype=dtype),
                 sequences, args, pad_id, results, args.json)
    if "int8" not in args.skip:
        evaluate("bnb int8 (LLM.int8, bf16 compute)", lambda: AutoModelForCausalLM.from_pretrained(
            args.source, dtype=dtype, quantization_config=BitsAndBytesConfig(load_in_8bit=True)),
            sequences, args, pad_id, results, args.json)

    fingerprints: dict[str, list[str]] = {}
    for bundle in bundles:
        fingerprints.setdefault(results["bundles"][str(bundle)]["base_sha256_16"], []).append(bundle.name)
    for fp, names in fingerprints.items():
        first = next(b for b in bundles if b.name == names[0])
        evaluate(f"plain NF4 [{fp}] (adapter disabled; {', '.join(names)})",
                 lambda: AutoPeftModelForCausalLM.from_pretrained(first, dtype=dtype),
                 sequences, args, pad_id, results, args.json, context=lambda m: m.disable_adapter())
    for bundle in bundles:
        evaluate(f"bundle {bundle.name}", lambda: AutoPeftModelForCausalLM.from_pretrained(bundle, dtype=dtype),
                 sequences, args, pad_id, results, args.json)
    print_tables(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def print_tables(results: dict, args) -> None:
    print("\nconversions:")
    print(f"{'bundle':<14} {'rank':>4} {'solver':>6} {'wall s':>8} {'peak RSS MiB':>12} {'rel err after':>13} "
          f"{'q0 svd/before':>13} {'q0 after/before':>15} {'base sha':>16}")
    for path, b in results["bundles"].items():
        q0 = b.get("layer0_q_proj", {})
        wall = b.get("wall_seconds", b["report_total_seconds"])
        peak = b.get("peak_rss_bytes", b["report_peak_rss_bytes"])
        print(f"{Path(path).name:<14} {b['rank']:>4} {b['solver']:>6} {wall:>8.1f} {peak / MiB:>12.1f} "
              f"{b['relative_error_after']:>13.4f} {q0.get('svd_init_over_before', float('nan')):>13.4f} "
              f"{q0.get('after_over_before', float('nan')):>15.4f} {b['base_sha256_16']:>16}")
    models = results["models"]
    if not models:
        return
    plain = next((r["ppl"] for n, r in models.items() if n.startswith("plain NF4")), None)
    int8 = next((r["ppl"] for n, r in models.items() if n.startswith("bnb int8")), None)
    print(f"\nperplexity on {results.get('heldout', {}).get('records')} held-out records "
          f"({results.get('heldout', {}).get('tokens')} tokens), eval mode, no_grad, bf16:")
    print(f"{'model':<60} {'ppl':>9} {'gap closed':>10}")
    for name, r in models.items():
        gap = ""
        if name.startswith("bundle") and plain is not None and int8 is not None and plain != int8:
            r["gap_closed"] = (plain - r["ppl"]) / (plain - int8)
            gap = f"{r['gap_closed']:.3f}"
        print(f"{name:<60} {r['ppl']:>9.4f} {gap:>10}")


if __name__ == "__main__":
    sys.exit(main())
