"""Does reading the next layer ahead on a background thread (convert.prefetch) pay on this device?

Converts --model in this process, alternating rounds with the read-ahead on and off (pipeline.reads_ahead,
which the library decides by device type), after one small warm-up conversion that pays the imports, and
prints each run's wall seconds and phase split:

    python benchmarks/read_ahead.py                       # SmolLM2, CPU, 32 samples, 2 rounds
    python benchmarks/read_ahead.py --num-samples 128 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from workplace import DEFAULT_CALIB, DEFAULT_SOURCE, require_calibration


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_SOURCE)
    p.add_argument("--calib", type=Path, default=DEFAULT_CALIB)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    require_calibration(args.calib)

    from quailora_convert.convert import ConvertSettings, convert, pipeline
    from quailora_convert.convert.allocator import serve_large_blocks_from_mmap

    serve_large_blocks_from_mmap()  # as the CLI does
    runs: dict[str, list[dict]] = {"read ahead": [], "in turn": []}
    with tempfile.TemporaryDirectory(prefix="quailora-read-ahead-") as tmp:
        def run(num_samples: int) -> dict:
            out = Path(tmp) / "bundle"
            started = time.perf_counter()
            convert(ConvertSettings(model=str(args.model), out=out, calib=str(args.calib), num_samples=num_samples,
                                    device=args.device, overwrite=True))
            wall = time.perf_counter() - started
            phases = json.loads((out / "quailora_report.json").read_text())["timings"]["phase_seconds"]
            return {"wall_seconds": wall, "phase_seconds": phases}

        run(8)  # warm-up: imports and first-touch costs
        for _ in range(args.rounds):
            for mode in runs:
                pipeline.reads_ahead = lambda device, on=mode == "read ahead": on
                runs[mode].append(run(args.num_samples))
                print(mode, json.dumps(runs[mode][-1]), flush=True)
    phases = list(runs["read ahead"][0]["phase_seconds"])
    print("| read-ahead | wall s (each round) | median | " + " | ".join(phases) + " (medians) |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in phases) + " |")
    for mode, done in runs.items():
        walls = [r["wall_seconds"] for r in done]
        print(f"| {mode} | {', '.join(f'{w:.1f}' for w in walls)} | {statistics.median(walls):.1f} | " + " | ".join(
            f"{statistics.median(r['phase_seconds'][k] for r in done):.1f}" for k in phases) + " |")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
