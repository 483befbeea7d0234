"""How close a conversion comes to the work it cannot avoid: its wall time over a bare forward pass.

For each --variant (extra CLI options; "" = the defaults) the quailora-convert console script converts
--model as a user runs it, in its own process, and the bundle report's per-phase seconds are read back.
The reference is a bare full-precision (float32) forward pass of the same model over the same
calibration tokens in the same batches (the library's own draw: read_texts, sample_token_sequences,
longest_first, make_batches with the conversion's settings), on the same device, in its own process,
under torch.no_grad(), timed after a warm-up batch: the decoder only (model.model: what a conversion
runs) and, for reference, with the output head, and the decoder over the drawn order's batches (what
conversions before longest-first batching ran: about twice the padded positions on SmolLM2). Then, in a
process of its own set up as the CLI sets up a conversion, the floor: the work a conversion cannot avoid, one
forward pass plus the H update, run by the library's own capture code over the same batches (time_floor).
With --repeat N the conversions run in N rounds, and a forward pass is timed before each round and
after the last, so that every conversion sits between two forward passes (a shared host drifts by 10%
within an hour):

    ratio = median conversion wall seconds (process start to exit) / median decoder forward seconds
    adjacent ratios = each conversion over the mean of the forward passes just before and after it
    ratio to floor = median conversion wall seconds / median floor seconds (1.0: nothing but the floor)

    python benchmarks/speed.py --json /tmp/speed.json                       # SmolLM2, CPU, defaults
    python benchmarks/speed.py --repeat 3 --json /tmp/speed.json            # 3 conversions, 4 forwards
    python benchmarks/speed.py --variant "" --variant "--rounding nearest --refine 0"
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workplace import DEFAULT_CALIB, DEFAULT_SOURCE, console_script, require_calibration


def _batches(args) -> tuple[list, list]:
    """(the conversion's batches, longest first; the same sequences' batches in drawn order)."""
    from transformers import AutoTokenizer

    from quailora_convert.calibration.batches import longest_first, make_batches, pad_token_id, sample_token_sequences
    from quailora_convert.calibration.texts import read_texts

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = read_texts(str(args.calib), max_records=2 * args.num_samples, seed=args.seed)
    sequences = sample_token_sequences(texts, tokenizer, args.num_samples, args.seq_len, args.seed)
    pad = pad_token_id(tokenizer)
    return make_batches(longest_first(sequences), args.batch_size, pad), make_batches(sequences, args.batch_size, pad)


def _float32_model(args, device):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device).eval()


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def forward_child(args) -> None:
    """In a child process: seconds of the bare float32 forward over the calibration tokens."""
    import torch

    from quailora_convert.calibration.batches import position_count, token_count

    device = torch.device(args.device)
    batches, drawn = _batches(args)
    model = _float32_model(args, device)
    result = {"tokens": token_count(batches), "padded_tokens": position_count(batches),
              "drawn_order_padded_tokens": position_count(drawn)}
    for name, run, timed in (("decoder", model.model, batches), ("with_head", model, batches),
                             ("drawn_order_decoder", model.model, drawn)):
        result[f"{name}_seconds"] = time_forward_pass(run, timed, device)
    print(json.dumps(result))


def time_forward_pass(run, batches: list, device) -> float:
    """Seconds of run (the model, or its decoder model.model) over batches under torch.no_grad(), after a
    warm-up batch."""
    import torch

    with torch.no_grad():
        first = batches[0]
        run(input_ids=first.input_ids.to(device), attention_mask=first.attention_mask.to(device), use_cache=False)
        _synchronize(device)
        started = time.perf_counter()
        for b in batches:
            run(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device), use_cache=False)
        _synchronize(device)
        return time.perf_counter() - started


def floor_child(args) -> None:
    """In a child process, set up as the CLI sets up a conversion (its allocator setting first): time_floor
    over the conversion's batches, after a warm-up batch."""
    import torch

    from quailora_convert.convert.allocator import heap_for_forward, serve_large_blocks_from_mmap

    serve_large_blocks_from_mmap()  # as cli/convert.py does before a conversion
    device = torch.device(args.device)
    batches, _ = _batches(args)
    model = _float32_model(args, device)
    with torch.no_grad(), heap_for_forward():
        first = batches[0]
        model.model(input_ids=first.input_ids.to(device), attention_mask=first.attention_mask.to(device),
                    use_cache=False)
    print(json.dumps(time_floor(model, batches, device)))


def time_floor(model, batches: list, device, dtype=None, hessian_dtype=None) -> dict:
    """The work a conversion cannot avoid (one forward pass plus the H update), timed as a conversion runs it:
    the model's front once per batch (capture_layer_calls), then each decoder layer over every batch with the H
    update of every input group of its linears (accumulate_hessians), each in heap_for_forward as the pipeline
    runs them. No reads, rounding, solves or writes. floor_positions: the batches' padded positions;
    floor_group_tokens: the tokens summed into H over all groups and layers. dtype: of the forward (the model's
    own; default float32), hessian_dtype: of the H update's inputs (default float32), as a conversion's."""
    import torch

    from quailora_convert.calibration.batches import position_count
    from quailora_convert.convert.allocator import heap_for_forward
    from quailora_convert.convert.architectures import find_decoder_layers, linear_modules
    from quailora_convert.convert.capture import CALIBRATION_DTYPE, accumulate_hessians, capture_layer_calls
    from quailora_convert.convert.phases import PhaseTimer

    dtype = dtype or CALIBRATION_DTYPE
    hessian_dtype = hessian_dtype or torch.float32
    _, layers = find_decoder_layers(model)
    timer = PhaseTimer(device)
    group_tokens = 0
    started = time.perf_counter()
    with torch.no_grad():
        with heap_for_forward():
            hidden, calls = capture_layer_calls(model, layers, batches, device, dtype=dtype)
        for layer, layer_calls in zip(layers, calls):
            with heap_for_forward():
                hessians = accumulate_hessians(layer, linear_modules(layer), hidden, layer_calls, batches, device,
                                               timer, dtype, hessian_dtype)
            group_tokens += sum(s.tokens for s in hessians.sums.values())
    _synchronize(device)
    return {"floor_seconds": time.perf_counter() - started, "floor_hessian_seconds": timer.seconds["hessian"],
            "floor_positions": position_count(batches), "floor_group_tokens": group_tokens}


def _run_child(args, flag: str) -> dict:
    command = [sys.executable, __file__, flag, "--model", str(args.model), "--calib", str(args.calib),
               "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len),
               "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--device", args.device]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{flag.removeprefix('--')} timing failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_forward(args) -> dict:
    """The bare forward passes, then the floor, each in its own process."""
    return _run_child(args, "--forward-child") | _run_child(args, "--floor-child")


def time_conversion(args, variant: str, out: Path) -> dict:
    command = [console_script(), str(args.model), "--calib", str(args.calib), "--out", str(out), "--overwrite",
               "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len),
               "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--device", args.device,
               *shlex.split(variant)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    report = json.loads((out / "quailora_report.json").read_text())
    return {"variant": variant or "(defaults)", "wall_seconds": wall, "report_total_seconds":
            report["timings"]["total_seconds"], "phase_seconds": report["timings"]["phase_seconds"],
            "tokens": report["calibration"]["tokens"], "relative_error_after": report["summary"]["relative_error_after"]}


def _summary(variant: str, conversions: list[dict], forward_seconds: list[float], decoder: float,
             floor: float) -> dict:
    """One variant's rounds: median wall and phases, the ratios of medians (to the bare forward and to the
    floor), and each round's adjacent ratio (round i ran between forward passes i and i + 1)."""
    walls = [c["wall_seconds"] for c in conversions]
    middle = sorted(range(len(walls)), key=walls.__getitem__)[len(walls) // 2]  # the median round's phases
    return {"variant": variant or "(defaults)", "rounds": conversions, "wall_seconds": statistics.median(walls),
            "ratio": statistics.median(walls) / decoder, "ratio_to_floor": statistics.median(walls) / floor,
            "phase_seconds": conversions[middle]["phase_seconds"],
            "adjacent_ratios": [w / statistics.mean(forward_seconds[i:i + 2]) for i, w in enumerate(walls)],
            "relative_error_after": conversions[middle]["relative_error_after"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_SOURCE)
    p.add_argument("--calib", type=Path, default=DEFAULT_CALIB)
    p.add_argument("--variant", action="append", help='extra quailora-convert options; "" = defaults (repeatable)')
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=1, help="rounds of conversions, each followed by a forward pass")
    p.add_argument("--json", type=Path)
    p.add_argument("--forward-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--floor-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.forward_child:
        forward_child(args)
        return 0
    if args.floor_child:
        floor_child(args)
        return 0
    require_calibration(args.calib)
    variants = args.variant if args.variant is not None else [""]
    forwards = [time_forward(args)]
    runs: dict[str, list[dict]] = {variant: [] for variant in variants}
    with tempfile.TemporaryDirectory(prefix="quailora-speed-") as tmp:
        for round_index in range(args.repeat):
            for i, variant in enumerate(variants):
                runs[variant].append(time_conversion(args, variant, Path(tmp) / f"bundle{i}"))
                print(json.dumps(runs[variant][-1]), flush=True)
            forwards.append(time_forward(args))
            print(json.dumps({"forward": forwards[-1]}), flush=True)
    seconds = [f["decoder_seconds"] for f in forwards]
    decoder = statistics.median(seconds)
    with_head = statistics.median(f["with_head_seconds"] for f in forwards)
    drawn = statistics.median(f["drawn_order_decoder_seconds"] for f in forwards)
    floor = statistics.median(f["floor_seconds"] for f in forwards)
    floor_hessian = statistics.median(f["floor_hessian_seconds"] for f in forwards)
    print(f"bare float32 forward over {forwards[0]['tokens']} tokens ({forwards[0]['padded_tokens']} positions): "
          f"decoder {decoder:.1f} s ({[round(s, 1) for s in seconds]}), with head {with_head:.1f} s; "
          f"in drawn order ({forwards[0]['drawn_order_padded_tokens']} positions) {drawn:.1f} s")
    print(f"floor (the decoder's forward plus the H update, as a conversion runs them): {floor:.1f} s "
          f"({floor / decoder:.2f}x the decoder forward; H update {floor_hessian:.1f} s)")
    summaries = [_summary(variant, conversions, seconds, decoder, floor) for variant, conversions in runs.items()]
    phases = list(summaries[0]["phase_seconds"])
    print("| variant | wall s | ratio to forward | adjacent ratios | ratio to floor | " + " | ".join(phases) + " |")
    print("| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in phases) + " |")
    for s in summaries:
        print(f"| {s['variant']} | {s['wall_seconds']:.0f} | {s['ratio']:.2f} | "
              f"{', '.join(f'{r:.2f}' for r in s['adjacent_ratios'])} | {s['ratio_to_floor']:.2f} | "
              + " | ".join(f"{s['phase_seconds'][k]:.1f}" for k in phases) + " |")
    if args.json:
        args.json.write_text(json.dumps({"forwards": forwards, "decoder_seconds": decoder,
                                         "drawn_order_decoder_seconds": drawn, "floor_seconds": floor,
                                         "with_head_seconds": with_head, "conversions": summaries}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
