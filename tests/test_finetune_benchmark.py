"""benchmarks/finetune.py on a tiny bundle: every init over seeds with plain PEFT + Trainer, one file per run,
skipped when present; the report's arithmetic on synthetic runs; the adapter measurements against direct products."""
import json
import math
import random
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bundles import make_bundle
from tiny_models import VOCAB

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "finetune.py"


@pytest.fixture(scope="module")
def bench() -> dict:
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(SCRIPT.parent))  # as when run as a script: its sibling benchmarks/workplace.py
        return runpy.run_path(str(SCRIPT))  # main() runs only as a script


def alpaca_records(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(VOCAB - 4)]
    return [{"instruction": " ".join(rng.choice(words) for _ in range(6)), "input": "",
             "output": " ".join(rng.choice(words[:40]) for _ in range(rng.randint(5, 20)))} for _ in range(count)]


def run_script(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def all_finite(values) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def test_runs_every_init_over_seeds_resumes_and_reports(tmp_path):
    source, bundle = make_bundle(tmp_path)
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(alpaca_records(40, seed=1)))
    forget = tmp_path / "forget.jsonl"
    forget.write_text("\n".join(json.dumps(r) for r in alpaca_records(30, seed=2)))
    out = tmp_path / "ft"
    common = ["--source", str(source), "--bundle", f"quailora={bundle}", "--plain", f"plain={bundle}", "--int8",
              "--seeds", "2", "--steps", "3", "--data", str(data), "--eval-records", "8", "--forget-data", str(forget),
              "--forget-records", "8", "--forget-calib-samples", "16", "--micro-batch", "8", "--max-len", "48",
              "--threads", "1", "--no-gradient-checkpointing", "--out", str(out)]
    first = run_script(*common)
    files = {(label, seed): out / "runs" / label / f"seed-{seed}.json" for label in ("quailora", "plain", "int8")
             for seed in (0, 1)}
    runs = {key: json.loads(path.read_text()) for key, path in files.items()}
    for (label, seed), run in runs.items():
        assert [p["step"] for p in run["curve"]] == [0, 1, 2, 3], label
        assert all_finite([p["task"] for p in run["curve"]] + [p["forget"] for p in run["curve"]]), label
        assert run["curve"][-1]["task"] < run["curve"][0]["task"], label  # training lowers held-out perplexity
        assert len(run["losses"]) == 3 and all_finite(l["grad_norm"] for l in run["losses"]), label
        assert run["grad_norm_first"]["steps"] == 3 and math.isfinite(run["grad_norm_first"]["mean"])
        norms = run["init_norms"]
        assert set(norms) == {"all", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert all_finite(v for kind in norms.values() for v in kind.values()) and norms["all"]["A"] > 0
        distances = [p["distance"]["all"] for p in run["curve"]]
        assert distances[0]["absolute"] < 1e-6 and distances[-1]["absolute"] > 0, label
        assert run["seconds"]["cpu"] > 0 and run["seconds"]["wall"] > 0
        if label == "quailora":  # the init is not zero: the distance is also relative to it
            assert norms["all"]["scaled_BA"] > 0 and all_finite(d["relative"] for d in distances)
        else:  # PEFT's default init: B = 0, and no relative distance
            assert norms["all"]["B"] == 0 and all(d["relative"] is None for d in distances)
    for label in ("quailora", "plain", "int8"):  # seeds are different data orders ...
        assert runs[label, 0]["losses"][-1]["loss"] != runs[label, 1]["losses"][-1]["loss"]
    assert runs["plain", 0]["init_norms"]["all"]["A"] != runs["plain", 1]["init_norms"]["all"]["A"]  # ... and A's
    assert runs["quailora", 0]["curve"][0]["task"] == runs["quailora", 1]["curve"][0]["task"]  # the same init
    assert runs["quailora", 0]["curve"][0]["task"] != pytest.approx(runs["plain", 0]["curve"][0]["task"], rel=1e-4)
    assert runs["quailora", 0]["bundle_settings"]["solver"] == "exact"
    assert (out / "finetune.png").stat().st_size > 10_000 and "| quailora | 2 |" in first.stdout

    # resume: present runs are skipped, a missing one is run, --only selects
    stamps = {key: path.stat().st_mtime_ns for key, path in files.items()}
    files["quailora", 1].unlink()
    second = run_script(*common, "--only", "quailora")
    assert "1 runs done, 1 skipped" in second.stdout
    assert all(path.stat().st_mtime_ns == stamps[key] for key, path in files.items() if key != ("quailora", 1))
    assert json.loads(files["quailora", 1].read_text())["losses"] == runs["quailora", 1]["losses"]  # deterministic
    assert not list(out.glob("runs/*/*.tmp")) and not list(out.glob("runs/*/*.lock"))
    report = json.loads((out / "report.json").read_text())
    assert report["runs"] == 6 and report["inits"]["quailora"]["paired_seeds"] == [0, 1]


def synthetic_run(label: str, kind: str, seed: int, task: list[float], forget: list[float]) -> dict:
    curve = [{"step": 10 * i, "task": t, "forget": f, "distance": {"all": {"absolute": 0.1 * i, "relative": None}}}
             for i, (t, f) in enumerate(zip(task, forget))]
    return {"label": label, "kind": kind, "bundle": "/b", "seed": seed, "protocol": {"steps": 10 * (len(task) - 1)},
            "curve": curve, "grad_norm_first": {"mean": 1.0 + seed}, "seconds": {"cpu": 5.0, "wall": 6.0},
            "init_norms": {"all": {"A": 1.0, "B": 0.0, "scaled_BA": 0.0}}}


def test_report_gap_is_paired_by_seed_then_averaged(bench):
    rng = random.Random(0)
    for case in range(200):
        points, seeds = rng.randint(2, 6), rng.sample(range(10), rng.randint(1, 4))
        runs, expected_gap, wins = [], [[] for _ in range(points)], []
        forget_delta = []
        for seed in seeds:
            int8 = [rng.uniform(2, 3) for _ in range(points)]
            plain = [q + rng.uniform(0.01, 1) for q in int8]
            init = [rng.uniform(q - 0.5, p + 0.5) for q, p in zip(int8, plain)]
            forgets = {name: [rng.uniform(3, 5) for _ in range(points)] for name in ("int8", "plain", "init")}
            runs += [synthetic_run("int8", "int8", seed, int8, forgets["int8"]),
                     synthetic_run("plain", "plain", seed, plain, forgets["plain"]),
                     synthetic_run("init", "bundle", seed, init, forgets["init"])]
            for i in range(points):
                expected_gap[i].append((plain[i] - init[i]) / (plain[i] - int8[i]))
            wins += [i < p for i, p in zip(init, plain)]
            forget_delta.append(forgets["init"][-1] - forgets["plain"][-1])
        runs.append(synthetic_run("init", "bundle", 99, [1.0] * points, [1.0] * points))  # unpaired: left out
        rng.shuffle(runs)
        row = bench["summarise"](runs)["inits"]["init"]
        assert row["paired_seeds"] == sorted(seeds) and row["seeds"] == sorted(seeds + [99]), case
        for i in range(points):
            assert row["gap_closed"][i]["mean"] == pytest.approx(sum(expected_gap[i]) / len(seeds), rel=1e-12)
            assert row["gap_closed"][i]["n"] == len(seeds)
        assert row["beats_plain"] == {"every": all(wins), "won": sum(wins), "of": len(wins)}, case
        assert row["forget_final_minus_plain"]["mean"] == pytest.approx(sum(forget_delta) / len(seeds))
        summary = bench["summarise"](runs)
        assert summary["inits"]["plain"]["gap_closed"][-1]["mean"] == pytest.approx(0.0, abs=1e-12)
        assert summary["inits"]["int8"]["gap_closed"][-1]["mean"] == pytest.approx(1.0, rel=1e-12)
        assert summary["cpu_seconds"] == 5.0 * len(runs)
    assert bench["gap_closed"](2.0, 2.2, 2.0) == 1.0 and bench["gap_closed"](2.1, 2.2, 2.2) is None


def test_report_refuses_mixed_protocols(bench):
    runs = [synthetic_run("plain", "plain", 0, [3, 2], [4, 4]), synthetic_run("int8", "int8", 0, [3, 2, 1], [4, 4, 4])]
    with pytest.raises(SystemExit, match="different protocols"):
        bench["summarise"](runs)


def test_factor_norms_and_distance_match_direct_products(bench):
    generator = torch.Generator().manual_seed(0)
    shapes = {"model.layers.0.self_attn.q_proj": (24, 16), "model.layers.1.self_attn.q_proj": (24, 16),
              "model.layers.0.mlp.down_proj": (16, 40)}
    init, now = {}, {}
    for path, (out, inp) in shapes.items():
        init[path] = (torch.randn(4, inp, generator=generator, dtype=torch.float64),
                      torch.randn(out, 4, generator=generator, dtype=torch.float64), 0.5)
        now[path] = (init[path][0] + 0.1 * torch.randn(4, inp, generator=generator, dtype=torch.float64),
                     init[path][1] + 0.1 * torch.randn(out, 4, generator=generator, dtype=torch.float64), 0.5)
    norms = bench["factor_norms"](init)
    products = {p: s * B @ A for p, (A, B, s) in init.items()}
    assert norms["all"]["scaled_BA"] == pytest.approx(math.sqrt(sum(float(M.square().sum()) for M in products.values())))
    assert norms["all"]["A"] == pytest.approx(math.sqrt(sum(float(A.square().sum()) for A, _, _ in init.values())))
    assert norms["q_proj"]["B"] == pytest.approx(math.sqrt(sum(float(init[p][1].square().sum()) for p in shapes
                                                               if p.endswith("q_proj"))))
    distance = bench["distance_from_init"](now, init)
    moved = {p: s * B @ A - products[p] for p, (A, B, s) in now.items()}
    want = math.sqrt(sum(float(D.square().sum()) for D in moved.values()))
    assert distance["all"]["absolute"] == pytest.approx(want, rel=1e-9)
    assert distance["all"]["relative"] == pytest.approx(want / norms["all"]["scaled_BA"], rel=1e-9)
    assert distance["down_proj"]["absolute"] == pytest.approx(float(moved["model.layers.0.mlp.down_proj"].norm()))
    assert bench["distance_from_init"](init, init)["all"]["absolute"] < 1e-6 * want


def test_forget_text_leaves_out_what_the_calibration_read(bench, tmp_path):
    """calibration_draw is the library's own draw: the records sample_token_sequences picks for a conversion."""
    from transformers import AutoTokenizer

    from quailora_convert.calibration.batches import sample_token_sequences
    from quailora_convert.calibration.files import read_file_texts

    source, _ = make_bundle(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(source)
    path = tmp_path / "forget.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in alpaca_records(50, seed=3)))
    texts = read_file_texts(path)
    for samples, seed in ((16, 0), (16, 1), (40, 0), (80, 0)):
        drawn = bench["calibration_draw"](len(texts), samples, seed)
        read = sample_token_sequences(texts, tokenizer, samples, 32, seed)
        assert sorted(read) == sorted(tokenizer(texts[i], truncation=True, max_length=32)["input_ids"] for i in drawn)
    unread = bench["forget_texts"](path, 10, 16, 0)
    drawn = bench["calibration_draw"](len(texts), 16, 0)
    assert unread == [t for i, t in enumerate(texts) if i not in drawn][:10]
    with pytest.raises(SystemExit, match="fewer than"):
        bench["forget_texts"](path, 40, 16, 0)


def test_lock_and_protocol_guard_the_run_files(bench, tmp_path):
    path = tmp_path / "runs" / "x" / "seed-0.json"
    path.parent.mkdir(parents=True)
    assert bench["take_lock"](path)
    assert not bench["take_lock"](path)  # held by a live process (this one)
    bench["release_lock"](path)
    path.with_name(path.name + ".lock").write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": socket.gethostname()}))
    assert bench["take_lock"](path)  # a dead holder's lock is taken over
    spec = bench["RunSpec"]("x", "plain", Path("/b"))
    existing = {"kind": "plain", "bundle": "/b", "protocol": {"steps": 200, "max_len": 128}}
    bench["check_same_run"](existing, spec, {"steps": 200, "max_len": 128}, path)
    with pytest.raises(SystemExit, match="steps differ"):
        bench["check_same_run"](existing, spec, {"steps": 100, "max_len": 128}, path)
    with pytest.raises(SystemExit, match="another label"):
        bench["check_same_run"](existing, bench["RunSpec"]("x", "bundle", Path("/b")), existing["protocol"], path)


def test_a_run_stopped_at_a_checkpoint_resumes_to_the_same_numbers(tmp_path):
    """A run stopped mid-way (--stop-after, or a killed process: the same saved state) goes on from its last
    checkpoint and ends with the losses, perplexities and distances of a run never stopped, across an epoch."""
    source, bundle = make_bundle(tmp_path)
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(alpaca_records(40, seed=1)))  # 32 training records: 2 steps of 16 an epoch
    forget = tmp_path / "forget.jsonl"
    forget.write_text("\n".join(json.dumps(r) for r in alpaca_records(30, seed=2)))

    def common(out: Path) -> list[str]:
        return ["--source", str(source), "--bundle", f"quailora={bundle}", "--plain", f"plain={bundle}",
                "--seed-list", "3", "--steps", "4", "--data", str(data), "--eval-records", "8", "--forget-data",
                str(forget), "--forget-records", "8", "--forget-calib-samples", "16", "--micro-batch", "8",
                "--max-len", "48", "--threads", "1", "--no-gradient-checkpointing", "--out", str(out)]

    whole, parted = tmp_path / "whole", tmp_path / "parted"
    run_script(*common(whole))
    stopped = run_script(*common(parted), "--stop-after", "3")
    assert "stopped at step 3" in stopped.stdout
    for label in ("quailora", "plain"):
        partial = parted / "runs" / label / "seed-3.partial"
        progress = json.loads((partial / "progress.json").read_text())
        assert progress["step"] == 3 and [p["step"] for p in progress["curve"]] == [0, 1, 2, 3]
        assert [c.name for c in partial.glob("checkpoint-*")] == ["checkpoint-3"]  # older ones dropped
        assert not (parted / "runs" / label / "seed-3.json").exists()
    resumed = run_script(*common(parted))
    assert "resumed at step 3" in resumed.stdout
    for label in ("quailora", "plain"):
        one, two = (json.loads((out / "runs" / label / "seed-3.json").read_text()) for out in (whole, parted))
        assert two["resumed_at"] == [3] and one["resumed_at"] == []
        assert two["losses"] == one["losses"], label  # the same data order and optimizer state after the stop
        assert two["curve"] == one["curve"], label
        assert two["init_norms"] == one["init_norms"]
        assert two["seconds"]["cpu"] > two["seconds"]["load_cpu"] > 0
        assert not (parted / "runs" / label / "seed-3.partial").exists()
    assert not list(parted.glob("runs/*/*.lock"))


def test_a_partial_run_from_another_init_is_refused(bench, tmp_path):
    spec = bench["RunSpec"]("x", "bundle", Path("/b"))
    partial = bench["PartialRun"](tmp_path / "seed-0.partial")
    (partial.checkpoint(40)).mkdir(parents=True)
    (partial.checkpoint(40) / "trainer_state.json").write_text("{}")
    norms = {"all": {"A": 2.0, "B": 2.0, "scaled_BA": 1.0}}
    saved = {"label": "x", "kind": "bundle", "bundle": "/b", "seed": 0, "protocol": {"steps": 200},
             "init_norms": norms, "curve": [], "losses": [], "resumed": [], "seconds": {}}
    partial.commit(40, saved)
    assert partial.progress(spec, 0, {"steps": 200}, norms)["step"] == 40
    last_bits = {"all": {"A": 2.0 * (1 + 1e-14), "B": 2.0, "scaled_BA": 1.0}}  # another thread count's sums
    assert partial.progress(spec, 0, {"steps": 200}, last_bits)["step"] == 40
    partial.commit(40, {**saved, "micro_batch": 4})
    with pytest.raises(SystemExit, match="--micro-batch 4"):
        partial.progress(spec, 0, {"steps": 200}, norms, micro_batch=8)
    assert partial.progress(spec, 0, {"steps": 200}, norms, micro_batch=4)["step"] == 40
    with pytest.raises(SystemExit, match="converted again"):
        partial.progress(spec, 0, {"steps": 200}, {"all": {"A": 2.0, "B": 2.0, "scaled_BA": 1.5}})
    with pytest.raises(SystemExit, match="holds seed 0"):
        partial.progress(spec, 1, {"steps": 200}, norms)
    with pytest.raises(SystemExit, match="steps differ"):
        partial.progress(spec, 0, {"steps": 100}, norms)
    partial.commit(80, saved)  # the Trainer wrote no checkpoint-80: progress names a missing folder
    assert not partial.checkpoint(40).exists()
    with pytest.raises(SystemExit, match="not there"):
        partial.progress(spec, 0, {"steps": 200}, norms)


def test_adapter_dtype_trains_the_factors_in_bfloat16_and_is_part_of_the_run(bench, tmp_path):
    """--adapter-dtype LABEL=bfloat16: the LoRA factors (only they) load and train in bfloat16, the run records it,
    and a run file of the other dtype under the same label is refused."""
    source, bundle = make_bundle(tmp_path)
    model = bench["load_model"](bench["RunSpec"]("q", "bundle", bundle, "bfloat16"), source, "cpu", False)
    dtypes = {(("lora_" in n), str(p.dtype)) for n, p in model.named_parameters()}
    assert (True, "torch.bfloat16") in dtypes and (True, "torch.float32") not in dtypes
    assert (False, "torch.bfloat16") not in dtypes  # the base is left as loaded
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(alpaca_records(40, seed=1)))
    forget = tmp_path / "forget.jsonl"
    forget.write_text("\n".join(json.dumps(r) for r in alpaca_records(30, seed=2)))
    out = tmp_path / "ft"
    args = ["--source", str(source), "--bundle", f"q={bundle}", "--adapter-dtype", "q=bfloat16", "--steps", "2",
            "--data", str(data), "--eval-records", "8", "--forget-data", str(forget), "--forget-records", "8",
            "--forget-calib-samples", "16", "--micro-batch", "8", "--max-len", "48", "--threads", "1",
            "--no-gradient-checkpointing", "--out", str(out)]
    report = run_script(*args)
    run = json.loads((out / "runs" / "q" / "seed-0.json").read_text())
    assert run["adapter_dtype"] == "bfloat16" and all_finite(p["task"] for p in run["curve"])
    assert "bfloat16 factors" in report.stdout
    with pytest.raises(SystemExit, match="with bfloat16 factors"):
        bench["check_same_run"](run, bench["RunSpec"]("q", "bundle", bundle), run["protocol"], out)
    for bad, said in (("q=int4", "DTYPE one of"), ("nope=bfloat16", "no such label")):
        refused = subprocess.run([sys.executable, str(SCRIPT), *args[:4], "--adapter-dtype", bad, "--out", str(out)],
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and said in refused.stderr, refused.stderr
