"""Held-out perplexity of QuAILoRA bundle variants against plain NF4 (QLoRA), bnb int8 and the source.

Held-out text, two kinds, each model evaluated on both:
- code: --records records of code_alpaca_2k.json (a different task and text type from the calibration
  data: distribution shift), chosen with random.Random(--seed), formatted with format_alpaca.
- instructions: the records of the calibration file (self_instruct_alpaca.jsonl) that the calibration draw
  did not pick (same kind of text as the calibration, never seen by it: separates overfitting to the
  calibration samples, GPTQ's known risk, from distribution shift), at most --records of them.
Both truncated to --max-len tokens. Perplexity is token level: exp(sum NLL / predicted tokens), padding
excluded. Every model is evaluated in eval mode under torch.no_grad() with bf16 as the load dtype
(the source is stored in bf16 and the bundles' compute dtype is bf16), so all rows share one setting.

Variants are RANK:SOLVER:ROUNDING:REFINE (64:exact:gptq:2 = rank 64, closed-form solver, GPTQ codes,
2 refinement rounds); each is built by the CLI into --build-dir/r64-exact-gptq-refine2.
Rows: the source (bf16); bnb int8 (transformers' BitsAndBytesConfig(load_in_8bit=True)); every distinct
base with the adapter disabled (bundles sharing a base are checked by hashing the base shards; the
round-to-nearest base is plain NF4 QLoRA); each bundle with its adapter.
"fraction of the NF4->int8 gap closed" = (ppl_plain_nf4 - ppl_bundle) / (ppl_plain_nf4 - ppl_int8), with
plain NF4 = the round-to-nearest base.

    python benchmarks/quality.py --build-dir /tmp/qbundles --variants 64:exact:nearest:0 64:exact:gptq:0 \
        64:exact:gptq:2 --json /tmp/quality.json
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

from workplace import DEFAULT_CALIB, DEFAULT_SOURCE, REPO, SHARED

DEFAULT_HELDOUT = SHARED / "data" / "calib" / "code_alpaca_2k.json"
MiB = 1 << 20


# -- building bundles -----------------------------------------------------------------------------
def parse_variant(spec: str) -> dict:
    rank, solver, rounding, refine = spec.split(":")
    return {"rank": int(rank), "solver": solver, "rounding": rounding, "refine": int(refine),
            "name": f"r{rank}-{solver}" + ("" if rounding == "nearest" else f"-{rounding}")
                    + (f"-refine{refine}" if int(refine) else "")}


def build_bundle(source: Path, out: Path, variant: dict, args) -> dict:
    """Convert in a child process (the CLI); wall time and that child's peak RSS via os.wait4."""
    if (out / REPORT).exists():
        report = json.loads((out / REPORT).read_text())
        print(f"reusing {out}", flush=True)
        return {"wall_seconds": report["timings"]["total_seconds"], "peak_rss_bytes": report["peak_rss_bytes"],
                "built_now": False}
    exe = shutil.which("quailora-convert") or "quailora-convert"
    cmd = [exe, str(source), "--calib", str(args.calib), "--out", str(out), "--bits", str(args.bits),
           "--rank", str(variant["rank"]), "--solver", variant["solver"], "--rounding", variant["rounding"],
           "--refine", str(variant["refine"]), "--num-samples", str(args.num_samples),
           "--seq-len", str(args.seq_len), "--device", "cpu", "--report-baseline"]  # layer 0's SVD-init row
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
    out = {"rank": s["rank"], "solver": s["solver"], "rounding": s.get("rounding", "nearest"),
           "refine": s.get("refine", 0), "bits": s["bits"], "num_samples": s["num_samples"],
           "seq_len": s["seq_len"], "relative_error_after": report["summary"]["relative_error_after"],
           "error_before": report["summary"]["error_before"], "error_after": report["summary"]["error_after"],
           "error_nearest": report["summary"].get("error_nearest", report["summary"]["error_before"]),
           "report_total_seconds": report["timings"]["total_seconds"],
           "report_peak_rss_bytes": report["peak_rss_bytes"]}
    if q0 and q0.get("error_svd_init") is not None:  # bundles made with --report-baseline
        out["layer0_q_proj"] = {"error_before": q0["error_before"], "error_svd_init": q0["error_svd_init"],
                                "error_after": q0["error_after"],
                                "svd_init_over_before": q0["error_svd_init"] / q0["error_before"],
                                "after_over_before": q0["error_after"] / q0["error_before"]}
    return out


def load_bundle(bundle: Path, dtype):
    """The quantized base at the bundle's root with its adapter from quailora_init/ (PEFT, attached once)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from quailora_convert.bundle.layout import INIT_ADAPTER_DIR

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bundle, dtype=dtype), bundle,
                                     subfolder=INIT_ADAPTER_DIR)


def base_fingerprint(bundle: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(bundle.glob("model*.safetensors")):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(16 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


# -- perplexity -----------------------------------------------------------------------------------
def heldout_sequences(tokenizer, path: Path, records: int, seed: int, max_len: int) -> list[list[int]]:
    """code: records of an Alpaca .json file, drawn with seed."""
    from quailora_convert.calibration.formats import format_alpaca

    data = json.loads(path.read_text())
    chosen = random.Random(seed).sample(range(len(data)), min(records, len(data)))
    texts = [format_alpaca(data[i]) for i in chosen]
    return [ids for ids in (tokenizer(t, truncation=True, max_length=max_len)["input_ids"] for t in texts) if len(ids) >= 2]


def unseen_calibration_sequences(tokenizer, args) -> list[list[int]]:
    """instructions: records of the calibration file that the conversions' calibration draw did not pick.

    The draw is the library's own (read_texts + sample_token_sequences with the conversions' settings);
    a record is excluded when its calibration-length tokens equal a drawn sample's.
    """
    from quailora_convert.calibration.batches import sample_token_sequences
    from quailora_convert.calibration.texts import read_texts

    texts = read_texts(str(args.calib))
    drawn = {tuple(ids) for ids in sample_token_sequences(texts, tokenizer, args.num_samples, args.seq_len, 0)}
    unseen = [t for t in texts if tuple(tokenizer(t, truncation=True, max_length=args.seq_len)["input_ids"]) not in drawn]
    chosen = random.Random(args.seed).sample(unseen, min(args.records, len(unseen)))
    return [ids for ids in (tokenizer(t, truncation=True, max_length=args.max_len)["input_ids"] for t in chosen)
            if len(ids) >= 2]


def perplexity(model, sequences: list[list[int]], batch_size: int, pad_id: int) -> dict:
    """The library's perplexity (quailora_convert.evaluate), under this script's key names."""
    from quailora_convert.evaluate import perplexity as measure

    result = measure(model, sequences, batch_size, pad_id)
    return {"ppl": result["perplexity"], "nll_sum": result["nll_sum"], "tokens": result["tokens"],
            "eval_seconds": result["seconds"]}


def evaluate(name: str, loader, heldout: dict[str, list[list[int]]], args, pad_id, results: dict,
             json_path: Path | None, context=None) -> dict:
    if name in results["models"] and args.resume:
        print(f"{name}: reusing {results['models'][name]}", flush=True)
        return results["models"][name]
    model = loader()
    row = {}
    with (context(model) if context else nullcontext()):
        for kind, sequences in heldout.items():
            row[kind] = perplexity(model, sequences, args.batch_size, pad_id)
    row["dtype"] = str(next(p.dtype for p in model.parameters() if p.is_floating_point()))
    results["models"][name] = row
    print(f"{name}: " + ", ".join(f"{k} ppl {row[k]['ppl']:.4f}" for k in heldout), flush=True)
    del model
    gc.collect()
    if json_path:
        _save(json_path, results)
    return row


def _save(path: Path, results: dict) -> None:
    path.write_text(json.dumps(results, indent=2, default=str))  # Paths (the settings) as strings


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    p.add_argument("--bundles", type=Path, nargs="*", default=[], help="existing bundles to evaluate")
    p.add_argument("--build-dir", type=Path, help="build (or reuse) r{rank}-{solver} bundles here")
    p.add_argument("--variants", nargs="+", default=["64:exact:nearest:0", "64:exact:gptq:0"],
                   help="RANK:SOLVER:ROUNDING:REFINE, built into --build-dir")
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
        for variant in map(parse_variant, args.variants):
            out = args.build_dir / variant["name"]
            build = build_bundle(args.source, out, variant, args)
            if build["built_now"] or str(out) not in results["builds"]:
                results["builds"][str(out)] = build
            bundles.append(out)
            if args.json:
                _save(args.json, results)
    if not bundles and not args.build_only:
        print("no bundles: give --bundles or --build-dir", file=sys.stderr)
    for bundle in bundles:
        results["bundles"][str(bundle)] = {**bundle_summary(bundle), "base_sha256_16": base_fingerprint(bundle),
                                           **results["builds"].get(str(bundle), {})}
    if args.json:
        _save(args.json, results)
    if args.build_only:
        print_tables(results, args)
        return 0

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from quailora_convert.calibration.batches import pad_token_id

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.source)
    pad_id = pad_token_id(tokenizer)
    heldout = {"code": heldout_sequences(tokenizer, args.heldout, args.records, args.seed, args.max_len),
               "instructions": unseen_calibration_sequences(tokenizer, args)}
    results["heldout"] = {kind: {"records": len(seqs), "tokens": sum(len(s) for s in seqs)}
                          for kind, seqs in heldout.items()}
    results["heldout"]["code"]["file"] = str(args.heldout)
    results["heldout"]["instructions"]["file"] = f"{args.calib} (records the calibration did not draw)"
    print(f"held-out: {results['heldout']}", flush=True)
    dtype = torch.bfloat16

    if "source" not in args.skip:
        evaluate("source (bf16)", lambda: AutoModelForCausalLM.from_pretrained(args.source, dtype=dtype),
                 heldout, args, pad_id, results, args.json)
    if "int8" not in args.skip:
        evaluate("bnb int8 (LLM.int8, bf16 compute)", lambda: AutoModelForCausalLM.from_pretrained(
            args.source, dtype=dtype, quantization_config=BitsAndBytesConfig(load_in_8bit=True)),
            heldout, args, pad_id, results, args.json)

    fingerprints: dict[str, list[str]] = {}
    for bundle in bundles:
        fingerprints.setdefault(results["bundles"][str(bundle)]["base_sha256_16"], []).append(bundle.name)
    for fp, names in fingerprints.items():
        first = next(b for b in bundles if b.name == names[0])
        rounding = results["bundles"][str(first)]["rounding"]
        label = "plain NF4" if rounding == "nearest" else f"{rounding} base"
        evaluate(f"{label} [{fp}] (adapter disabled; {', '.join(names)})",
                 lambda: load_bundle(first, dtype),
                 heldout, args, pad_id, results, args.json, context=lambda m: m.disable_adapter())
    for bundle in bundles:
        evaluate(f"bundle {bundle.name}", lambda: load_bundle(bundle, dtype),
                 heldout, args, pad_id, results, args.json)
    print_tables(results, args)
    if args.json:
        _save(args.json, results)
    return 0


def print_tables(results: dict, args) -> None:
    print("\nconversions:")
    print(f"{'bundle':<26} {'wall s':>8} {'peak RSS MiB':>12} {'rel err after':>13} {'base err / nearest':>18} "
          f"{'base sha':>16}")
    for path, b in results["bundles"].items():
        wall = b.get("wall_seconds", b["report_total_seconds"])
        peak = b.get("peak_rss_bytes", b["report_peak_rss_bytes"])
        print(f"{Path(path).name:<26} {wall:>8.1f} {peak / MiB:>12.1f} {b['relative_error_after']:>13.4f} "
              f"{b['error_before'] / b['error_nearest']:>18.4f} {b['base_sha256_16']:>16}")
    models = results["models"]
    if not models:
        return
    kinds = [k for k in ("code", "instructions") if k in next(iter(models.values()))]
    plain = next((r for n, r in models.items() if n.startswith("plain NF4")), None)
    int8 = next((r for n, r in models.items() if n.startswith("bnb int8")), None)
    print("\nperplexity on held-out text (eval mode, no_grad, bf16): "
          + "; ".join(f"{k}: {results['heldout'][k]['records']} records, {results['heldout'][k]['tokens']} tokens"
                      for k in kinds))
    print(f"{'model':<70} " + " ".join(f"{k + ' ppl':>16} {'gap closed':>10}" for k in kinds))
    for name, r in models.items():
        cells = []
        for k in kinds:
            gap = ""
            if plain is not None and int8 is not None and plain[k]["ppl"] != int8[k]["ppl"] and not name.startswith(
                    ("source", "bnb int8", "plain NF4")):
                r[k]["gap_closed"] = (plain[k]["ppl"] - r[k]["ppl"]) / (plain[k]["ppl"] - int8[k]["ppl"])
                gap = f"{r[k]['gap_closed']:.3f}"
            cells.append(f"{r[k]['ppl']:>16.4f} {gap:>10}")
        print(f"{name:<70} " + " ".join(cells))


if __name__ == "__main__":
    sys.exit(main())
