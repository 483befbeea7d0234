"""Peak memory of a conversion versus model depth: it must not grow with the number of layers.

Builds two random-weight Llama checkpoints that differ only in num_hidden_layers (6 and 24 by
default; hidden 1024, intermediate 2816, 16 heads, 4 KV heads, SmolLM2 tokenizer and vocab, bf16
safetensors in 200MB shards), converts each in its own subprocess with the same calibration, and
prints layers, source size, wall time and peak RSS. Exits 1 if peak(deep) / peak(shallow) > --max-ratio.

    python benchmarks/memory.py                      # 6 vs 24 layers, ratio <= 1.15 required
    python benchmarks/memory.py --threads default    # children without OMP_NUM_THREADS: torch's default threading
    python benchmarks/memory.py --threads 1          # children with OMP_NUM_THREADS=1 (as the tests run)
    python benchmarks/memory.py --json /tmp/mem.json --keep /tmp/membench
    MALLOC_ARENA_MAX=2 python benchmarks/memory.py   # the environment is passed to the children
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/memory.py   # fixed mmap threshold: freed tensors go back to the OS
    MEMBENCH_MALLOC_TRIM=1 MEMBENCH_LIVE_TENSORS=1 python benchmarks/memory.py --trace   # diagnosis (see child_main)
    MEMBENCH_MALLOC_INFO=1 python benchmarks/memory.py --trace   # per layer: threads, glibc arenas (malloc_info)
    MEMBENCH_NO_ALLOCATOR=1 python benchmarks/memory.py          # without the CLI's allocator setting (not with --cli)

--threads says how many intra-op threads the children get: env (the default) passes OMP_NUM_THREADS
as the environment has it; default removes OMP_NUM_THREADS and MKL_NUM_THREADS from the children's
environment, so torch picks its own thread count as it does for a user's `quailora-convert`; N sets
OMP_NUM_THREADS=N. The summary prints which it was, and the thread count torch reports under it.

Peak RSS per child is read with os.wait4 (that child's own rusage; RUSAGE_CHILDREN would report the
maximum over all children so far) and compared with the bundle report's peak_rss_bytes. The child
runs quailora_convert.convert.convert() (with the CLI's allocator setting) and prints VmRSS / RssAnon / RssFile after every layer
(--cli runs the quailora-convert console script instead, without that trace).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from quailora_convert.bundle.layout import CONFIG, REPORT

from workplace import DEFAULT_CALIB, DEFAULT_SOURCE, REPO, console_script

DEFAULT_TOKENIZER = DEFAULT_SOURCE  # the real SmolLM2 folder's tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
MiB = 1 << 20


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in bytes."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            values[key] = int(rest.split()[0]) * 1024
    return values


# -- building the source checkpoints -------------------------------------------------------------
def build_model(folder: Path, layers: int, tokenizer_dir: Path, args) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size=args.shard_size)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copyfile(tokenizer_dir / name, folder / name)
    del model


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.suffix == ".safetensors")


def malloc_arenas() -> str:
    """glibc's malloc_info, summed up: per arena (heap) its system bytes and free bytes, and the mmap'd blocks."""
    import ctypes
    import re

    libc = ctypes.CDLL("libc.so.6")
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    with tempfile.NamedTemporaryFile("r", suffix=".xml") as tmp:
        handle = libc.fopen(tmp.name.encode(), b"w")
        libc.malloc_info(0, handle)
        libc.fclose(handle)
        xml = tmp.read()
    heaps = []
    for body in re.findall(r'<heap nr="\d+">(.*?)</heap>', xml, re.DOTALL):
        system = int(re.search(r'<system type="current" size="(\d+)"', body).group(1))
        free = sum(int(v) for v in re.findall(r'<total type="(?:fast|rest)" count="\d+" size="(\d+)"', body))
        heaps.append(f"{system / MiB:.0f}/{free / MiB:.0f}")
    mmapped = re.search(r'<total type="mmap" count="(\d+)" size="(\d+)"', xml.rpartition("</heap>")[2])
    tail = f" mmap {int(mmapped.group(2)) / MiB:.0f} MiB in {mmapped.group(1)}" if mmapped else ""
    return f"arenas (MiB system/free) {' '.join(heaps)}{tail}"


def live_tensor_bytes() -> int:
    """Bytes of distinct CPU tensor storages reachable from gc-tracked objects (parameters included)."""
    import gc

    import torch

    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        except Exception:  # noqa: BLE001 - meta tensors, odd subclasses
            pass
    return total


# -- one conversion in a child process ------------------------------------------------------------
def child_main(argv: list[str]) -> None:
    """`memory.py _child MODEL OUT CALIB N SEQ RANK BITS SOLVER`: convert with a per-layer RSS trace."""
    import gc
    import resource

    model, out, calib, n, seq, rank, bits, solver = argv
    from quailora_convert.convert import ConvertSettings, convert
    from quailora_convert.convert.allocator import serve_large_blocks_from_mmap
    from quailora_convert.events import LayerConverted

    trim = os.environ.get("MEMBENCH_MALLOC_TRIM") == "1"  # investigation: malloc_trim(0) after each event
    live = os.environ.get("MEMBENCH_LIVE_TENSORS") == "1"  # investigation: bytes of tensors reachable by gc
    arenas = os.environ.get("MEMBENCH_MALLOC_INFO") == "1"  # investigation: glibc arenas (malloc_info)
    libc = None
    if trim:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")

    def trace(tag: str) -> None:
        s = proc_status()
        line = (f"  [rss] {tag:<16} VmRSS {s['VmRSS'] / MiB:8.1f}  RssAnon {s['RssAnon'] / MiB:8.1f}  "
                f"RssFile {s['RssFile'] / MiB:8.1f}  VmHWM {s['VmHWM'] / MiB:8.1f} MiB")
        if live:
            line += f"  live tensors {live_tensor_bytes() / MiB:8.1f} MiB"
        if arenas:
            line += f"  threads {len(os.listdir('/proc/self/task'))}  {malloc_arenas()}"
        if libc is not None:
            libc.malloc_trim(0)
            line += f"  after malloc_trim: RssAnon {proc_status()['RssAnon'] / MiB:8.1f}"
        print(line, flush=True)

    def on_event(event) -> None:
        trace(f"layer {event.index + 1}/{event.count}" if isinstance(event, LayerConverted) else type(event).__name__)

    settings = ConvertSettings(model=model, out=Path(out), calib=calib, num_samples=int(n), seq_len=int(seq),
                               rank=int(rank), bits=int(bits), solver=solver, device="cpu", overwrite=True)
    if os.environ.get("MEMBENCH_NO_ALLOCATOR") != "1":  # investigation: =1 leaves glibc's defaults alone
        serve_large_blocks_from_mmap()  # as the CLI does before a conversion
    import torch
    print(f"  [rss] torch intra-op threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}", flush=True)
    trace("start")
    convert(settings, on_event=on_event)
    gc.collect()
    print(f"  [rss] ru_maxrss(self) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB", flush=True)


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def child_environment(threads: str) -> dict[str, str]:
    """The children's environment for --threads env | default | N."""
    env = dict(os.environ)
    if threads == "default":
        for name in THREAD_VARIABLES:
            env.pop(name, None)
    elif threads != "env":
        env["OMP_NUM_THREADS"] = str(int(threads))
    return env


def torch_threads(env: dict[str, str]) -> int:
    """torch.get_num_threads() in a fresh interpreter with env: the intra-op threads a child gets."""
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                           capture_output=True, text=True, check=True)
    return int(probe.stdout.split()[-1])


def threading_label(env: dict[str, str]) -> str:
    omp = env.get("OMP_NUM_THREADS")
    return f"OMP_NUM_THREADS={omp}" if omp is not None else "OMP_NUM_THREADS unset (torch's default)"


def run_conversion(model: Path, out: Path, args, log_path: Path, env: dict[str, str]) -> dict:
    if args.cli:
        cmd = [console_script(), str(model), "--calib", str(args.calib), "--out", str(out),
               "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len), "--rank", str(args.rank),
               "--bits", str(args.bits), "--solver", args.solver, "--device", "cpu", "--overwrite"]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "_child", str(model), str(out), str(args.calib),
               str(args.num_samples), str(args.seq_len), str(args.rank), str(args.bits), args.solver]
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stdout.write(log_path.read_text())
        raise SystemExit(f"conversion of {model} failed with exit code {proc.returncode}")
    report = json.loads((out / REPORT).read_text())
    return {"wall_seconds": wall, "peak_rss_wait4": usage.ru_maxrss * 1024, "peak_rss_report": report["peak_rss_bytes"],
            "relative_error_after": report["summary"]["relative_error_after"],
            "bundle_bytes": folder_bytes(out), "log": log_path.read_text()}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child_main(sys.argv[2:])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs=2, default=[6, 24], metavar=("SHALLOW", "DEEP"))
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--shard-size", default="200MB")
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    p.add_argument("--calib", type=Path, default=DEFAULT_CALIB)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--solver", default="exact")
    p.add_argument("--max-ratio", type=float, default=1.15)
    p.add_argument("--threads", default="env", help=(
        "children's threading: env (OMP_NUM_THREADS as in this environment), default (OMP_NUM_THREADS and "
        "MKL_NUM_THREADS removed: torch's default, as a user runs the CLI), or N (OMP_NUM_THREADS=N)"))
    p.add_argument("--cli", action="store_true", help="run the quailora-convert console script (no per-layer trace)")
    p.add_argument("--trace", action="store_true", help="print each child's per-layer RSS trace")
    p.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp dir, removed)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    if args.threads not in ("env", "default") and not (args.threads.isdigit() and int(args.threads) > 0):
        p.error(f"--threads must be env, default or a positive integer, got {args.threads!r}")
    env = child_environment(args.threads)
    threading = {"mode": args.threads, "omp_num_threads": env.get("OMP_NUM_THREADS"), "torch_threads": torch_threads(env)}

    if not (args.tokenizer / "tokenizer.json").exists():
        raise SystemExit(f"no tokenizer at {args.tokenizer}; run `python ../shared/scripts/smollm2.py` first")
    work = args.keep or Path(tempfile.mkdtemp(prefix="quailora-membench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = []
        for layers in args.layers:
            model = work / f"llama-{layers}l"
            if not (model / CONFIG).exists():
                # built in a subprocess too, so the parent stays small
                subprocess.run([sys.executable, "-c",
                                "import sys, runpy; sys.argv = sys.argv[1:]; "
                                "m = runpy.run_path(sys.argv[0]); m['_build_cli']()",
                                str(Path(__file__).resolve()), str(model), str(layers), str(args.tokenizer),
                                str(args.hidden), str(args.intermediate), str(args.heads), str(args.kv_heads),
                                args.shard_size], check=True)
            result = run_conversion(model, work / f"bundle-{layers}l", args, work / f"convert-{layers}l.log", env)
            result.update(layers=layers, source_bytes=folder_bytes(model),
                          shards=len(list(model.glob("*.safetensors"))))
            if args.trace:
                print(f"--- {layers} layers ---")
                print("\n".join(line for line in result["log"].splitlines() if "[rss]" in line))
            rows.append(result)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    shown = {k: env[k] for k in ("MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES",
                                 "OMP_NUM_THREADS", "MKL_NUM_THREADS", "MEMBENCH_MALLOC_TRIM",
                                 "MEMBENCH_NO_ALLOCATOR") if k in env}
    print(f"calibration {args.calib.name}: {args.num_samples} samples x {args.seq_len} tokens, rank {args.rank}, "
          f"{args.bits}-bit, solver {args.solver}; {'CLI' if args.cli else 'convert()'}; children's env {shown or '-'}")
    print(f"threading (--threads {args.threads}): {threading_label(env)}, torch intra-op threads "
          f"{threading['torch_threads']}")
    print(f"{'layers':>6} {'source MiB':>10} {'shards':>6} {'wall s':>8} {'peak RSS MiB':>13} {'report peak MiB':>16} "
          f"{'rel err after':>13}")
    for r in rows:
        print(f"{r['layers']:>6} {r['source_bytes'] / MiB:>10.1f} {r['shards']:>6} {r['wall_seconds']:>8.1f} "
              f"{r['peak_rss_wait4'] / MiB:>13.1f} {r['peak_rss_report'] / MiB:>16.1f} {r['relative_error_after']:>13.4f}")
    ratio = rows[1]["peak_rss_wait4"] / rows[0]["peak_rss_wait4"]
    ratio_report = rows[1]["peak_rss_report"] / rows[0]["peak_rss_report"]
    ok = ratio <= args.max_ratio
    print(f"peak({args.layers[1]}) / peak({args.layers[0]}) = {ratio:.3f} (wait4), {ratio_report:.3f} (report); "
          f"limit {args.max_ratio}: {'OK' if ok else 'FAIL'} ({threading_label(env)}, "
          f"{threading['torch_threads']} torch threads)")
    if args.json:
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "env": shown,
                                         "threading": threading,
                                         "rows": [{k: v for k, v in r.items() if k != "log"} for r in rows],
                                         "ratio": ratio, "ratio_report": ratio_report, "ok": ok}, indent=2))
    return 0 if ok else 1


def _build_cli() -> None:
    folder, layers, tokenizer, hidden, intermediate, heads, kv_heads, shard_size = sys.argv[1:]
    args = argparse.Namespace(hidden=int(hidden), intermediate=int(intermediate), heads=int(heads),
                              kv_heads=int(kv_heads), shard_size=shard_size)
    build_model(Path(folder), int(layers), Path(tokenizer), args)


if __name__ == "__main__":
    sys.exit(main())
