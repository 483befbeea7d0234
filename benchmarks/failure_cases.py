"""Issue 8's failure cases, run as a new user runs them, on this checkout and on another revision.

Prints a markdown table: for every case, the exit code and first line of output before (--against
REV, a git worktree) and after (this checkout). Small random Llama models on CPU; ~10 minutes.

    python benchmarks/failure_cases.py --against e83b5f6
    python benchmarks/failure_cases.py --against e83b5f6 --only nan_norm,rank_40
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


class Checkout:
    """Runs `quailora-convert` from one checkout: its packages first on the path (cli/ as quailora_cli)."""

    def __init__(self, root: Path, scratch: Path):
        self.root = root
        self.links = scratch / f"links-{root.name}"
        self.links.mkdir(parents=True, exist_ok=True)
        if not (self.links / "quailora_cli").exists():
            (self.links / "quailora_cli").symlink_to(root / "cli")

    def command(self, *args) -> list[str]:
        return [sys.executable, "-c", "from quailora_cli.main import main; main()", *map(str, args)]

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": f"{self.links}:{self.root}", "HF_HUB_OFFLINE": "1",
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

    def run(self, *args, timeout: float = 600) -> tuple[int, str, float]:
        started = time.perf_counter()
        done = subprocess.run(self.command(*args), capture_output=True, text=True, env=self.env(), timeout=timeout,
                              cwd=self.root)  # python -c puts the working folder first on the path
        return done.returncode, first_line(done.stderr, done.stdout), time.perf_counter() - started

    def start(self, *args) -> subprocess.Popen:
        return subprocess.Popen(self.command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env(), cwd=self.root)


def wait_for_layer(process: subprocess.Popen, layer: int) -> str:
    """Read the run's plain progress lines until layer `layer` is done; returns what was read."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(f"layer {layer}/"):
            break
    return "".join(seen)


def first_line(stderr: str, stdout: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and not _noise(line)]
    lines = [line for line in lines if line.startswith("error:")] or lines  # the error, not a warning before it
    if not lines:
        lines = [line.strip() for line in stdout.splitlines() if line.strip()][-1:]
    return lines[0][:160] if lines else "(nothing)"


def _noise(line: str) -> bool:
    return "gemm_4bit_forward" in line or "warnings.warn" in line


def leftovers(folder: Path, keep: set[str]) -> str:
    extra = sorted(p.name for p in folder.iterdir() if p.name not in keep)
    return ", ".join(extra) if extra else "nothing"


# -- inputs ------------------------------------------------------------------------------------------
def make_inputs(root: Path) -> dict[str, Path]:
    from safetensors.torch import load_file, save_file

    from tiny_models import save_tiny, tiny_llama_config, write_text_calibration

    root.mkdir(parents=True, exist_ok=True)
    paths = {"calib": write_text_calibration(root / "calib.jsonl", count=32)}
    paths["llama"] = save_tiny(tiny_llama_config(num_key_value_heads=1), root / "llama")  # k/v_proj: 32 outputs
    paths["deep"] = save_tiny(tiny_llama_config(hidden_size=256, intermediate_size=640, num_hidden_layers=6,
                                                head_dim=64), root / "deep")
    nan = save_tiny(tiny_llama_config(), root / "nan_norm", shard_size="10MB")
    weights = load_file(nan / "model.safetensors")
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, nan / "model.safetensors", metadata={"format": "pt"})
    paths["nan_norm"] = nan
    paths["words3"] = root / "three_words.txt"
    paths["words3"].write_text("hello big world\n")
    paths["blank"] = root / "blank.txt"
    paths["blank"].write_text("   \n\n\t \n")
    paths["binary"] = root / "binary.txt"
    paths["binary"].write_bytes(bytes(range(256)) * 64)
    return paths


def copy_source(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# -- cases ---------------------------------------------------------------------------------------------
def case_sigterm(cli: Checkout, inputs: dict, work: Path) -> str:
    out = work / "out"
    process = cli.start(inputs["deep"], "--calib", inputs["calib"], "--out", out, "--rank", 8, "--num-samples", 24,
                        "--seq-len", 48, "--batch-size", 4)
    wait_for_layer(process, 2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate()
    return f"{process.returncode} · `{first_line(stderr, '')}` · left: {leftovers(work, set())}"


def _convert_args(inputs: dict, source: Path, out: Path, *extra) -> list:
    return [source, "--calib", inputs["calib"], "--out", out, "--rank", 8, "--num-samples", 8, "--seq-len", 32, *extra]


def case_nan_norm(cli: Checkout, inputs: dict, work: Path) -> str:
    code, line, _ = cli.run(*_convert_args(inputs, inputs["nan_norm"], work / "out"))
    return f"{code} · `{line}`"


def case_rank_40(cli: Checkout, inputs: dict, work: Path) -> str:
    code, line, _ = cli.run(*_convert_args(inputs, inputs["llama"], work / "out")[:-6], "--rank", 40,
                            "--num-samples", 8, "--seq-len", 32)
    if code != 0:
        return f"{code} · `{line}`"
    load = subprocess.run([sys.executable, "-c", (
        "import sys, torch; from transformers import AutoModelForCausalLM; from peft import PeftModel\n"
        f"b = AutoModelForCausalLM.from_pretrained({str(work / 'out')!r}, dtype=torch.float32)\n"
        f"PeftModel.from_pretrained(b, {str(work / 'out')!r}); print('loads')")],
        capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    loaded = "loads in PEFT" if load.returncode == 0 else "PEFT: " + first_line(load.stderr.splitlines()[-1], "")[:70]
    return f"{code} · `{line}` · {loaded}"


def case_rank_huge(cli: Checkout, inputs: dict, work: Path) -> str:
    code, line, seconds = cli.run(*_convert_args(inputs, inputs["llama"], work / "out")[:-6], "--rank", 100000,
                                  "--num-samples", 8, "--seq-len", 32)
    return f"{code} · `{line}` · {seconds:.0f} s"


def case_concurrent(cli: Checkout, inputs: dict, work: Path) -> str:
    out = work / "out"
    args = [inputs["deep"], "--calib", inputs["calib"], "--out", out, "--rank", 8, "--num-samples", 24, "--seq-len", 48,
            "--batch-size", 4]
    first = cli.start(*args)
    wait_for_layer(first, 1)
    code, line, _ = cli.run(*args, "--overwrite")
    first.communicate()
    return f"first {first.returncode}; second {code} · `{line}`"


def case_overwrite_file(cli: Checkout, inputs: dict, work: Path) -> str:
    (work / "out").write_text("a file\n")
    code, line, _ = cli.run(*_convert_args(inputs, inputs["llama"], work / "out", "--overwrite"))
    return f"{code} · `{line}` · left: {leftovers(work, {'out'})}"


def _planned_disk_bytes(inputs: dict, work: Path) -> int:
    """What this checkout's --dry-run says the llama case needs on disk (bundle + work folder)."""
    done = subprocess.run(Checkout(REPO, work).command(*_convert_args(inputs, inputs["llama"], work / "planned"),
                                                       "--dry-run", "--json"),
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(done.stdout)["disk_bytes"]


def case_small_disk(cli: Checkout, inputs: dict, work: Path) -> str:
    """A disk with room for half of what the run needs."""
    return _on_tmpfs(cli, inputs, work, _planned_disk_bytes(inputs, work) // 2)


def _on_tmpfs(cli: Checkout, inputs: dict, work: Path, size: int) -> str:
    disk = work / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)]).returncode != 0:
        return "(no tmpfs: not root)"
    try:
        code, line, _ = cli.run(*_convert_args(inputs, inputs["llama"], disk / "out"))
        return f"{size:,} bytes: {code} · `{line}` · left: {leftovers(disk, {'out'})}"
    finally:
        subprocess.run(["umount", str(disk)])


def _bundle(cli: Checkout, inputs: dict, work: Path) -> Path:
    code, line, _ = cli.run(*_convert_args(inputs, inputs["llama"], work / "bundle"))
    assert code == 0, line
    return work / "bundle"


def case_eval_no_adapter(cli: Checkout, inputs: dict, work: Path) -> str:
    bundle = _bundle(cli, inputs, work)
    next(bundle.rglob("adapter_model.safetensors")).unlink()  # quailora_init/ (or the root, in a checkout before it)
    code, line, seconds = cli.run("eval", bundle, "--data", inputs["calib"], "--num-samples", 4, "--seq-len", 32)
    return f"{code} · `{line}` · {seconds:.0f} s"


def case_corrupt_report(cli: Checkout, inputs: dict, work: Path) -> str:
    bundle = _bundle(cli, inputs, work)
    (bundle / "quailora_report.json").write_text("{ not json")
    code, line, _ = cli.run("inspect", bundle)
    return f"inspect: {code} · `{line}`"


def case_truncated_shard(cli: Checkout, inputs: dict, work: Path) -> str:
    source = copy_source(inputs["llama"], work / "src")
    shard = sorted(source.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    code, line, _ = cli.run(*_convert_args(inputs, source, work / "out"))
    return f"{code} · `{line}`"


def case_config_not_json(cli: Checkout, inputs: dict, work: Path) -> str:
    source = copy_source(inputs["llama"], work / "src")
    (source / "config.json").write_text("this is not json")
    code, line, _ = cli.run(*_convert_args(inputs, source, work / "out"))
    return f"{code} · `{line}`"


def _calib_case(cli: Checkout, inputs: dict, work: Path, calib: Path) -> str:
    args = _convert_args(inputs, inputs["llama"], work / "out")
    args[2] = calib
    code, line, _ = cli.run(*args)
    return f"{code} · `{line}`"


def case_binary_calib(cli, inputs, work):
    return _calib_case(cli, inputs, work, inputs["binary"])


def case_three_words(cli, inputs, work):
    return _calib_case(cli, inputs, work, inputs["words3"])


def case_whitespace(cli, inputs, work):
    return _calib_case(cli, inputs, work, inputs["blank"])


# -- issue 22, items 1 and 4-8 (helper safety-source): nothing lost, nothing silently wrong ---------------------------
def _home(inputs: dict, work: Path) -> Path:
    """A user's folder: the source m_base, an earlier bundle, notes, and the calibration in data/."""
    import shutil

    home = work / "home"
    copy_source(inputs["llama"], home / "m_base")
    (home / "old_bundle").mkdir()
    (home / "old_bundle" / "adapter_model.safetensors").write_bytes(b"an earlier bundle")
    (home / "notes.txt").write_text("my notes\n")
    (home / "data").mkdir()
    shutil.copyfile(inputs["calib"], home / "data" / "calib.jsonl")
    return home


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _kept(home: Path, before: dict[str, bytes]) -> str:
    after = _files(home) if home.exists() else {}
    lost = [name for name, data in before.items() if after.get(name) != data]
    added = len(set(after) - set(before))
    return ("every file kept" if not lost else f"**{len(lost)}/{len(before)} files lost or changed**") + \
        (f", {added} added" if added else "")


def _overlap_case(cli: Checkout, inputs: dict, work: Path, out: str, *extra) -> str:
    home = _home(inputs, work)
    before = _files(home)
    code, line, _ = cli.run(home / "m_base", "--calib", home / "data" / "calib.jsonl", "--out", home / out, "--rank", 8,
                            "--num-samples", 8, "--seq-len", 32, *extra)
    return f"{code} · `{line}` · {_kept(home, before)}"


def case_out_is_source(cli, inputs, work):
    return _overlap_case(cli, inputs, work, "m_base", "--overwrite")


def case_out_holds_source(cli, inputs, work):
    return _overlap_case(cli, inputs, work, ".", "--overwrite")


def case_out_inside_source(cli, inputs, work):
    return _overlap_case(cli, inputs, work, "m_base/bundle")


def case_out_holds_calib(cli, inputs, work):
    return _overlap_case(cli, inputs, work, "data", "--overwrite")


def _plan_and_run(cli: Checkout, inputs: dict, work: Path, source: Path, *extra) -> str:
    args = _convert_args(inputs, source, work / "out", *extra)
    plan_code, plan_line, _ = cli.run(*args, "--dry-run")
    code, line, _ = cli.run(*args)
    return f"plan {plan_code} · `{plan_line[:70]}`; run {code} · `{line}`"


def case_untied_no_head(cli, inputs, work):
    """tie_word_embeddings false, no lm_head.weight in the shards."""
    from safetensors.torch import load_file, save_file

    source = copy_source(inputs["llama"], work / "src")
    index = json.loads((source / "model.safetensors.index.json").read_text())
    shard = source / index["weight_map"].pop("lm_head.weight")
    tensors = load_file(shard)
    del tensors["lm_head.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    return _plan_and_run(cli, inputs, work, source)


def case_missing_shard(cli, inputs, work):
    """The index lists a shard (the last layer's) that is not there."""
    source = copy_source(inputs["llama"], work / "src")
    index = json.loads((source / "model.safetensors.index.json").read_text())
    (source / index["weight_map"]["model.layers.1.mlp.down_proj.weight"]).unlink()
    return _plan_and_run(cli, inputs, work, source)


def _seq_len_case(cli: Checkout, work: Path, config) -> str:
    from tiny_models import save_tiny

    source = save_tiny(config, work / "src")
    text = work / "long.txt"
    text.write_text(" ".join(chr(ord("a") + i % 26) * (1 + i % 3) for i in range(3000)) + "\n")
    args = [source, "--calib", text, "--out", work / "out", "--rank", 8, "--num-samples", 4, "--seq-len", 512]
    plan_code, plan_line, _ = cli.run(*args, "--dry-run")
    done = subprocess.run(cli.command(*args), capture_output=True, text=True, env=cli.env(), cwd=cli.root)
    warned = "warning: --seq-len" in done.stdout + done.stderr
    line = first_line(done.stderr, done.stdout)
    tokens = "-"
    if done.returncode == 0:
        report = json.loads((work / "out" / "quailora_report.json").read_text())
        tokens = f"{report['calibration']['tokens']} tokens, seq_len {report['settings']['seq_len']}"
    return (f"plan {plan_code} · `{plan_line[:60]}`; run {done.returncode} · "
            f"{'warned · ' if warned else ''}{tokens if done.returncode == 0 else f'`{line}`'}")


def case_gpt2_seq_len_512(cli, inputs, work):
    """GPT-2 with 128 learned positions, --seq-len 512."""
    from transformers import GPT2Config

    return _seq_len_case(cli, work, GPT2Config(n_embd=128, n_inner=320, n_layer=2, n_head=4, n_positions=128,
                                               vocab_size=512, pad_token_id=1, bos_token_id=2, eos_token_id=3))


def case_llama_seq_len_512(cli, inputs, work):
    """A Llama with max_position_embeddings 128, --seq-len 512."""
    from tiny_models import tiny_llama_config

    return _seq_len_case(cli, work, tiny_llama_config(max_position_embeddings=128))


def case_nan_fixed_resume(cli, inputs, work):
    """NaN in layer 2's norm (its own shard): follow the advice (fix the file, --resume), spelling the folder anew."""
    from test_nothing_lost import poison, reshard
    from tiny_models import save_tiny, tiny_llama_config

    source = save_tiny(tiny_llama_config(num_hidden_layers=3), work / "m_base")
    reshard(source, [[0], [1], [2]])
    original = poison(source / "layers-2.safetensors", "model.layers.2.input_layernorm.weight")
    args = ["--calib", inputs["calib"], "--out", work / "out", "--rank", 8, "--num-samples", 8, "--seq-len", 32,
            "--resume-interval", 0]
    failed = subprocess.run(cli.command(source, *args), capture_output=True, text=True, env=cli.env(), cwd=cli.root)
    code, advice = failed.returncode, "advises --overwrite"
    if "then run the same command with --resume" in failed.stderr:
        advice = "advises fixing the file, then --resume"
    (source / "layers-2.safetensors").write_bytes(original)
    resumed, resumed_line, _ = cli.run(f"{work}/./m_base/", *args, "--resume")
    return f"{code}, {advice}; fixed + --resume: {resumed} · `{resumed_line[:90]}`"


def case_disk_full(cli, inputs, work):
    """A disk that fills after layer 1 of 6 (tmpfs, a filler file), then space freed and --resume."""
    disk = work / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", str(disk)]).returncode != 0:
        return "(no tmpfs: not root)"
    try:
        args = [inputs["deep"], "--calib", inputs["calib"], "--out", disk / "out", "--rank", 8, "--num-samples", 24,
                "--seq-len", 48, "--batch-size", 4, "--resume-interval", 0]
        process = cli.start(*args)
        wait_for_layer(process, 1)
        with open(disk / "filler", "wb") as filler:  # the rest of the disk
            try:
                while True:
                    filler.write(b"\0" * (1 << 20))
            except OSError:
                pass
        stdout, stderr = process.communicate()
        kept = (disk / "out.quailora-work" / "state.json").exists()
        (disk / "filler").unlink()
        code, line, _ = cli.run(*args, "--resume")
        return (f"{process.returncode} · `{first_line(stderr, stdout)[:110]}` · resume point "
                f"{'kept' if kept else 'lost'}; freed + --resume: {code}")
    finally:
        subprocess.run(["umount", str(disk)])


# -- issue 22, items 2, 3 and 9 (helper safety-eval): a bundle that cannot work, eval's source, small messages ---
def _run_at(cli: Checkout, cwd: Path, *args) -> subprocess.CompletedProcess:
    """The command run from cwd, as a user in that folder types it (relative paths resolve there)."""
    return subprocess.run(cli.command(*args), capture_output=True, text=True, env=cli.env(), cwd=cwd, timeout=600)


def _half_config_source(folder: Path, stored: str, key: str, index, value: float) -> Path:
    """A tiny Llama stored in `stored` whose config.json says float16, with weights[key][index] = value."""
    import torch

    from tiny_models import save_tiny_half_config

    def edit(weights):
        weights[key][index] = value

    return save_tiny_half_config(folder, getattr(torch, stored), edit)


def _logits_finite(bundle: Path) -> str:
    """Whether the bundle, loaded by plain transformers (float32, train mode as it fine-tunes), gives finite logits."""
    done = subprocess.run([sys.executable, "-c", (
        "import torch; from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(bundle)!r}, dtype=torch.float32); m.train()\n"
        "with torch.no_grad(): logits = m(input_ids=torch.tensor([[2, 10, 50, 300]])).logits\n"
        "print(bool(torch.isfinite(logits).all()))")],
        capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    return {"True": "logits finite", "False": "logits inf/NaN"}.get(done.stdout.strip(), "does not load")


def case_half_config_1e6(cli, inputs, work):
    source = _half_config_source(work / "src", "float32", "model.layers.0.mlp.down_proj.weight", (0, 0), 1e6)
    code, line, _ = cli.run(*_convert_args(inputs, source, work / "out"))
    if code != 0:
        return f"{code} · `{line}` · --out {'written' if (work / 'out').exists() else 'not written'}"
    compute = json.loads((work / "out" / "config.json").read_text())["quantization_config"]["bnb_4bit_compute_dtype"]
    return f"{code} · `{line[:110]}` · computes in {compute}, {_logits_finite(work / 'out')}"


def case_half_norm_activation(cli, inputs, work):
    source = _half_config_source(work / "src", "float16", "model.layers.0.input_layernorm.weight", slice(None), 6e4)
    code, line, _ = cli.run(*_convert_args(inputs, source, work / "out"))
    written = (work / "out").exists()
    finite = _logits_finite(work / "out") if written else ""
    return f"{code} · `{line[:120]}` · --out {'written, ' + finite if written else 'not written'}"


def _relative_bundle(cli: Checkout, inputs: dict, work: Path) -> tuple[Path, Path]:
    """A bundle converted from `m_base` typed relatively in work/a; work/b holds another model named m_base."""
    from tiny_models import save_tiny, tiny_llama_config

    save_tiny(tiny_llama_config(), work / "a" / "m_base", seed=0)
    save_tiny(tiny_llama_config(), work / "b" / "m_base", seed=1)
    done = _run_at(cli, work / "a", "m_base", "--calib", inputs["calib"], "--out", "bundle", "--rank", 8,
                   "--num-samples", 8, "--seq-len", 32)
    assert done.returncode == 0, done.stderr
    return work / "a" / "bundle", work / "a" / "m_base"


def _eval_at(cli: Checkout, inputs: dict, cwd: Path, bundle: Path, *extra) -> subprocess.CompletedProcess:
    return _run_at(cli, cwd, "eval", bundle, "--data", inputs["calib"], "--num-samples", 4, "--seq-len", 32, *extra)


def _gap(bundle: Path) -> str:
    gap = json.loads((bundle / "quailora_eval.json").read_text()).get("gap_closed")
    return "none" if gap is None else f"{gap:.1%}"


def case_eval_elsewhere(cli, inputs, work):
    bundle, source = _relative_bundle(cli, inputs, work)
    _eval_at(cli, inputs, work, bundle, "--source", source.resolve())
    right = _gap(bundle)
    done = _eval_at(cli, inputs, work / "b", bundle)
    return f"{done.returncode} · gap with the real source {right}; eval from another folder: {_gap(bundle)}"


def case_eval_keeps_complete(cli, inputs, work):
    bundle, source = _relative_bundle(cli, inputs, work)
    _eval_at(cli, inputs, work / "a", bundle)
    complete = (bundle / "quailora_eval.json").read_bytes()
    source.rename(work / "a" / "moved")
    done = _eval_at(cli, inputs, work / "a", bundle)
    kept = (bundle / "quailora_eval.json").read_bytes() == complete
    line = first_line(done.stderr, done.stdout)[:110]
    return f"{done.returncode} · `{line}` · complete eval {'kept' if kept else 'overwritten'}"


def case_eval_missing_data(cli, inputs, work):
    bundle = _bundle(cli, inputs, work)
    done = _eval_at(cli, {"calib": work / "missing.jsonl"}, work, bundle)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return f"{done.returncode} · `{first_line(done.stderr, '')[:100]}` · {len(lines)} stderr line(s)"


def case_bad_record_line_6(cli, inputs, work):
    lines = [json.dumps({"text": "one two three four five six"})] * 5 + [json.dumps({"txt": "no text field"})]
    (work / "calib.jsonl").write_text("\n".join(lines) + "\n")
    return _calib_case(cli, inputs, work, work / "calib.jsonl")


def case_refine_1_inspect(cli, inputs, work):
    code, line, _ = cli.run(*_convert_args(inputs, inputs["llama"], work / "out", "--refine", 1))
    done = _run_at(cli, work, "inspect", work / "out")
    base = next((line for line in done.stdout.splitlines() if line.startswith("base:")), "(no base line)")
    return f"{code} · `{' '.join(base.split())}`"


def case_rank_warning_stream(cli, inputs, work):
    done = _run_at(cli, work, *_convert_args(inputs, inputs["llama"], work / "out")[:-6], "--rank", 40,
                   "--num-samples", 8, "--seq-len", 32)
    where = [name for name, text in (("stdout", done.stdout), ("stderr", done.stderr)) if "--rank 40 exceeds" in text]
    return f"{done.returncode} · the rank warning on {', '.join(where) or 'neither'}"


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="git revision for the 'before' column")
    parser.add_argument("--only", help="comma-separated case names: " + ", ".join(CASES))
    args = parser.parse_args()
    chosen = args.only.split(",") if args.only else list(CASES)
    with tempfile.TemporaryDirectory(prefix="quailora-cases-") as scratch:
        scratch = Path(scratch)
        before = scratch / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(before), args.against],
                       check=True, capture_output=True)
        try:
            inputs = make_inputs(scratch / "inputs")
            checkouts = {"before": Checkout(before, scratch), "after": Checkout(REPO, scratch)}
            print(f"| case | before ({args.against}) | after (this checkout) |\n| --- | --- | --- |")
            for name in chosen:
                cells = []
                for label, cli in checkouts.items():
                    work = scratch / f"{name}-{label}"
                    work.mkdir()
                    cells.append(CASES[name](cli, inputs, work).replace("|", "\\|"))
                print(f"| {name} | {cells[0]} | {cells[1]} |", flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
