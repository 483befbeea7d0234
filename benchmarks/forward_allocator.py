"""What glibc's allocator settings do to a calibration forward pass: one process per setting.

The CLI serves blocks over 64 KiB from mmap so that host memory does not grow with the layer count
(convert/allocator.py); every such block is a fresh mapping the kernel faults in and zeroes. This times
SmolLM2's bare decoder forward and the conversion's layer-by-layer replay (capture_layer_calls, then each
layer on the recorded calls, without and with the H hooks) under:

    default        glibc's own dynamic thresholds
    mmap-64k       serve_large_blocks_from_mmap() alone (the CLI's setting between forward passes)
    forward-heap   serve_large_blocks_from_mmap() inside heap_for_forward() (what a conversion now runs)

    python benchmarks/forward_allocator.py                 # 32 samples <= 512 tokens, 2 repetitions each
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from workplace import DEFAULT_CALIB, DEFAULT_SOURCE

SETTINGS = ("default", "mmap-64k", "forward-heap")


def child(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quailora_convert.calibration.batches import make_batches, pad_token_id, sample_token_sequences
    from quailora_convert.calibration.texts import read_texts
    from quailora_convert.convert import allocator
    from quailora_convert.convert.capture import accumulate_hessians, capture_layer_calls

    if args.setting != "default":
        assert allocator.serve_large_blocks_from_mmap(), "glibc's mallopt is not available here"
    scope = allocator.heap_for_forward if args.setting == "forward-heap" else nullcontext
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = read_texts(str(args.calib), max_records=2 * args.num_samples, seed=0)
    batches = make_batches(sample_token_sequences(texts, tokenizer, args.num_samples, 512, 0), 8,
                           pad_token_id(tokenizer))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    device = torch.device("cpu")
    layers = model.model.layers
    seconds = {"bare": [], "replay": [], "replay_with_h": []}
    with torch.no_grad():
        model.model(input_ids=batches[0].input_ids, attention_mask=batches[0].attention_mask, use_cache=False)
        for _ in range(args.repeat):
            with scope():
                started = time.perf_counter()
                for b in batches:
                    model.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
                seconds["bare"].append(time.perf_counter() - started)
            for name in ("replay", "replay_with_h"):
                hidden, calls = capture_layer_calls(model, layers, batches, device)
                started = time.perf_counter()
                for i, layer in enumerate(layers):
                    with scope():
                        if name == "replay":
                            for b in range(len(batches)):
                                out = layer(hidden[b], **calls[i][b].kwargs)
                                hidden[b] = out[0] if isinstance(out, (tuple, list)) else out
                        else:
                            linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
                            accumulate_hessians(layer, linears, hidden, calls[i], batches, device)
                seconds[name].append(time.perf_counter() - started)
    print(json.dumps(seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--calib", type=Path, default=DEFAULT_CALIB)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)  # the child
    args = parser.parse_args()
    if args.setting:
        child(args)
        return
    for setting in SETTINGS:
        done = subprocess.run([sys.executable, __file__, "--setting", setting, "--model", str(args.model), "--calib",
                               str(args.calib), "--num-samples", str(args.num_samples), "--repeat", str(args.repeat)],
                              capture_output=True, text=True, check=True)
        seconds = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{setting:13s} " + "  ".join(f"{name} {statistics.median(v):6.2f} s ({', '.join(f'{x:.2f}' for x in v)})"
                                             for name, v in seconds.items()))


if __name__ == "__main__":
    main()
