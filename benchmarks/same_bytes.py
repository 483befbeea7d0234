"""Do two checkouts write the same bundles? For refactors that must not change a byte.

Builds small random-weight sources (a sharded 3-layer Llama, GPT-2 with Conv1D, Gemma 2) with the
tests' tiny-model helpers, converts each with this checkout and with --against REV (a git worktree
in a temporary folder) through the library API, and compares every file of every bundle:
safetensors, configs and tokenizer files byte for byte (the output folder's path masked in JSON),
the report up to float64 round-off (rel 1e-12; timings and peak RSS left out), the model card as
text. --smollm2 adds SmolLM2-135M-Instruct (../shared/scripts/smollm2.py, ~2 min per checkout on 2
cores). Exit 1 on any difference.

    python benchmarks/same_bytes.py --against main~1
    python benchmarks/same_bytes.py --against f33f122 --smollm2 --keep /tmp/same-bytes
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VOLATILE_REPORT_KEYS = ("timings", "peak_rss_bytes")

# name -> (source, ConvertSettings keyword arguments besides model/out/calib)
CASES = {
    "llama-nf4-exact": ("llama", dict(rank=8, num_samples=16, seq_len=32)),
    "llama-int8-als-rslora": ("llama", dict(bits=8, solver="als", als_steps=5, use_rslora=True, rank=4, num_samples=12,
                                            seq_len=32)),
    "llama-targets-seed3": ("llama", dict(target_modules=["q_proj", "down_proj"], rank=4, num_samples=8, seq_len=24,
                                          seed=3)),
    "llama-sharded": ("llama", dict(rank=4, num_samples=8, seq_len=32, max_shard_bytes=150_000)),
    "llama-self": ("llama", dict(calib="self", rank=4, num_samples=4, seq_len=16)),
    "gpt2-nf4-svd": ("gpt2", dict(solver="svd", rank=4, num_samples=8, seq_len=32)),
    "gemma2-nf4": ("gemma2", dict(rank=4, num_samples=8, seq_len=32)),
}
SMOLLM2_CASE = ("smollm2", dict(rank=16, num_samples=16, seq_len=128))

# Run inside a checkout (PYTHONPATH=it): the library API, from either package layout.
CONVERT = """
import json, sys
from pathlib import Path
try:
    from quailora_convert.convert import ConvertSettings, convert
except ImportError:  # the flat layout before the subpackages
    from quailora_convert.pipeline import ConvertSettings, convert
for out, kwargs in json.loads(sys.argv[1]):
    convert(ConvertSettings(out=Path(out), **kwargs))
"""


def build_sources(folder: Path, smollm2: bool) -> dict[str, str]:
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import save_tiny, tiny_llama_config, write_text_calibration
    from transformers import Gemma2Config, GPT2Config

    sources = {
        "llama": save_tiny(tiny_llama_config(num_hidden_layers=3), folder / "llama"),
        "gpt2": save_tiny(GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=512, n_positions=128, bos_token_id=2,
                                     eos_token_id=3), folder / "gpt2"),
        "gemma2": save_tiny(Gemma2Config(hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512,
                                         pad_token_id=1, bos_token_id=2, eos_token_id=3), folder / "gemma2"),
        "calib": write_text_calibration(folder / "calib.jsonl", count=40),
    }
    if smollm2:
        script = SHARED / "scripts" / "smollm2.py"
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
        sources["smollm2"] = Path(result.stdout.strip().splitlines()[-1])
        sources["smollm2-calib"] = SHARED / "data" / "calib" / "self_instruct_alpaca.jsonl"
    return {name: str(path) for name, path in sources.items()}


def convert_all(checkout: Path, out: Path, sources: dict[str, str], cases: dict) -> None:
    jobs = []
    for name, (source, kwargs) in cases.items():
        calib = sources["smollm2-calib"] if source == "smollm2" else sources["calib"]
        jobs.append((str(out / name), {"model": sources[source], "calib": calib, **kwargs}))
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    subprocess.run([sys.executable, "-c", CONVERT, json.dumps(jobs)], cwd=checkout, env=env, check=True)


def differences(a: Path, b: Path) -> list[str]:
    """What differs between two bundles of the same name under the roots a.parent and b.parent."""
    found = []
    names = sorted({p.relative_to(x).as_posix() for x in (a, b) for p in x.rglob("*") if p.is_file()})  # + quailora_init/
    for name in names:
        fa, fb = a / name, b / name
        if not (fa.is_file() and fb.is_file()):
            found.append(f"{a.name}/{name}: only in one of them")
        elif name == "quailora_report.json":
            found += [f"{a.name}/{name}: {d}" for d in _report_differences(fa, fb)]
        elif _masked(fa, a.parent) != _masked(fb, b.parent):
            found.append(f"{a.name}/{name}: bytes differ")
    return found


def _masked(path: Path, root: Path) -> bytes:
    data = path.read_bytes()
    return data.replace(str(root.resolve()).encode(), b"ROOT") if path.suffix in (".json", ".md") else data


def _report_differences(fa: Path, fb: Path) -> list[str]:
    a, b = (json.loads(_masked(f, f.parent.parent)) for f in (fa, fb))
    for report in (a, b):
        for key in VOLATILE_REPORT_KEYS:
            report.pop(key, None)
    found: list[str] = []
    _compare(a, b, "$", found)
    return found


def _compare(x, y, path: str, found: list[str]) -> None:
    if isinstance(x, float) and isinstance(y, float):
        if not math.isclose(x, y, rel_tol=1e-12):
            found.append(f"{path}: {x!r} != {y!r}")
    elif isinstance(x, dict) and isinstance(y, dict):
        if list(x) != list(y):
            found.append(f"{path}: keys {list(x)} != {list(y)}")
        for key in set(x) & set(y):
            _compare(x[key], y[key], f"{path}.{key}", found)
    elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        for i, (u, v) in enumerate(zip(x, y)):
            _compare(u, v, f"{path}[{i}]", found)
    elif x != y:
        found.append(f"{path}: {x!r} != {y!r}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", required=True, help="the git revision to compare this checkout with")
    p.add_argument("--smollm2", action="store_true", help="also convert SmolLM2-135M-Instruct (needs ../shared)")
    p.add_argument("--keep", type=Path, help="work here and keep the bundles (default: a temporary folder)")
    args = p.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="quailora-same-bytes-"))
    work.mkdir(parents=True, exist_ok=True)
    other = work / "other-checkout"
    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(other)], capture_output=True)
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(other), args.against],
                   check=True, capture_output=True)
    try:
        cases = dict(CASES, **({"smollm2-r16": SMOLLM2_CASE} if args.smollm2 else {}))
        sources = build_sources(work / "sources", args.smollm2)
        for label, checkout in (("this", REPO), ("other", other)):
            shutil.rmtree(work / label, ignore_errors=True)
            convert_all(checkout, work / label, sources, cases)
        found = []
        for name in cases:
            found += differences(work / "this" / name, work / "other" / name)
            for f in sorted((work / "this" / name).iterdir()):
                if f.suffix == ".safetensors":
                    print(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {name}/{f.name}")
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(other)], capture_output=True)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join(found) if found else f"identical: {len(cases)} bundles, this checkout vs {args.against}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
