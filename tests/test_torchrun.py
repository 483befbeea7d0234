"""torchrun: two processes (gloo, CPU) share one conversion and write what one process writes.

`torchrun --nproc-per-node 2 --no-python quailora-convert ...` against `quailora-convert ...` on the
same source and settings: base shards byte-identical (the default rounding depends on W alone), every
module's correction M = B A within 1e-3 relative Frobenius error (H is summed in another order), the
report records both ranks' shares, which add up to the single run's. Errors end both ranks with one line.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_process import run_cli
from quailora_convert.bundle.layout import INIT_ADAPTER_WEIGHTS
from tiny_models import save_tiny, tiny_llama_config, write_text_calibration

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")


def run_torchrun(*args, processes: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N --no-python quailora-convert ARGS` (python -m forms without
    the console scripts), offline, without debug tracebacks."""
    console = shutil.which("quailora-convert")
    program = ["--no-python", console] if console else ["-m", "quailora_cli"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               *program, *map(str, args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("QUAILORA_DEBUG", None)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("torchrun")
    config = tiny_llama_config(hidden_size=256, intermediate_size=640, num_hidden_layers=3, head_dim=64)
    source = save_tiny(config, root / "source")
    calib = write_text_calibration(root / "calib.jsonl", count=32)
    args = [source, "--calib", calib, "--rank", 8, "--num-samples", 24, "--seq-len", 48, "--batch-size", 4,
            "--device", "cpu", "--max-shard-bytes", 400_000, "--resume-interval", 0]
    single = run_cli(*args, "--out", root / "single", "--quiet")
    assert single.returncode == 0, single.stderr
    shared = run_torchrun(*args, "--out", root / "shared", "--quiet")
    assert shared.returncode == 0, shared.stderr
    return dict(root=root, args=args, single=root / "single", shared=root / "shared", stdout=shared.stdout)


def test_two_ranks_write_the_single_process_bundle(runs):
    single, shared = runs["single"], runs["shared"]
    assert sorted(p.name for p in single.iterdir()) == sorted(p.name for p in shared.iterdir())
    shards = sorted(p.name for p in single.glob("model*.safetensors"))
    assert len(shards) > 1
    for name in shards + ["model.safetensors.index.json", "config.json"]:
        assert (single / name).read_bytes() == (shared / name).read_bytes(), name
    one, two = load_file(single / INIT_ADAPTER_WEIGHTS), load_file(shared / INIT_ADAPTER_WEIGHTS)
    assert one.keys() == two.keys()
    corrections = [k for k in one if ".lora_A." in k]
    assert len(corrections) == 21  # 3 layers x 7 linears
    for key in corrections:
        b_key = key.replace(".lora_A.", ".lora_B.")
        M1 = one[b_key].double() @ one[key].double()  # (out, in)
        M2 = two[b_key].double() @ two[key].double()
        assert float((M1 - M2).norm() / M1.norm()) < 1e-3, key
    assert runs["stdout"].split() == [str(shared)]  # rank 0 alone prints


def test_the_report_shows_how_the_work_was_shared(runs):
    one = json.loads((runs["single"] / "quailora_report.json").read_text())["calibration"]
    two = json.loads((runs["shared"] / "quailora_report.json").read_text())["calibration"]
    assert one["world_size"] == 1 and one["ranks"] == [{"rank": 0, "samples": 24, "tokens": one["tokens"]}]
    assert two["world_size"] == 2 and [r["rank"] for r in two["ranks"]] == [0, 1]
    assert all(r["samples"] > 0 and r["tokens"] > 0 for r in two["ranks"])
    assert sum(r["samples"] for r in two["ranks"]) == one["samples"] == two["samples"] == 24
    assert sum(r["tokens"] for r in two["ranks"]) == one["tokens"] == two["tokens"]


@pytest.mark.parametrize("size", [2, 3, 8])
def test_batches_are_shared_by_padded_positions(size):
    from quailora_convert.convert.ranks import Ranks

    generator = torch.Generator().manual_seed(size)
    for _ in range(50):  # calibration batches longest first: padded positions of 8 rows each
        costs = sorted((8 * torch.randint(16, 513, (int(torch.randint(size, 40, (), generator=generator)),),
                                          generator=generator)).tolist(), reverse=True)
        shares = [Ranks(rank=r, size=size).share(costs) for r in range(size)]
        assert sorted(i for share in shares for i in share) == list(range(len(costs)))  # each batch once
        assert all(share == sorted(share) and share for share in shares)  # in order; none empty
        loads = [sum(costs[i] for i in share) for share in shares]
        assert max(loads) - min(loads) <= costs[0]  # no rank idles longer than the longest batch takes
        round_robin = [sum(costs[rank::size]) for rank in range(size)]  # batch b to rank b mod N
        assert max(loads) <= max(round_robin)
    if size == 2:  # where b mod N is uneven: 5 + 3 + 3 against 4 + 3
        assert [Ranks(rank=r, size=2).share([5, 4, 3, 3, 3]) for r in range(2)] == [[0, 3], [1, 2, 4]]


def ours(stderr: str) -> list[str]:
    """The processes' own stderr lines, without torchrun's: its log lines ("E1201 02:33:07.543000 ...") and
    its failure summary (the launcher's traceback, then a table of the ranks' exit codes)."""
    lines = stderr.splitlines()
    end = next((i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")), len(lines))
    return [line for line in lines[:end] if line.strip() and not re.match(r"[IWE]\d{4} \d\d:\d\d:\d\d", line)]


def test_an_error_on_rank_0_ends_both_ranks_with_one_line(runs):
    existing = runs["shared"]  # --out exists: rank 0 refuses before anything is read
    done = run_torchrun(*runs["args"], "--out", existing, timeout=300)
    assert done.returncode != 0
    lines = ours(done.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: --out ") and "already exists" in lines[0], done.stderr


def test_too_few_batches_for_the_ranks_is_one_line(runs):
    args = list(runs["args"])
    args[args.index("--batch-size") + 1] = 24  # one batch of all 24 samples for two processes
    done = run_torchrun(*args, "--out", runs["root"] / "few", timeout=300)
    assert done.returncode != 0
    lines = ours(done.stderr)
    assert len(lines) == 1 and "calibration batches for 2 processes" in lines[0], done.stderr
    assert not (runs["root"] / "few").exists()


def stopped_after_one_layer(args: list, out: Path) -> str:
    """torchrun with 2 ranks, sent SIGTERM (it passes the signal on) once a resume point after layer 1
    exists; returns its stderr."""
    console = shutil.which("quailora-convert")
    program = ["--no-python", console] if console else ["-m", "quailora_cli"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *program,
               *map(str, args), "--out", str(out), "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    state = out.with_name(out.name + ".quailora-work") / "state.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and launcher.poll() is None:
        try:
            if json.loads(state.read_text())["next_layer"] >= 1:
                break
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.02)
    launcher.send_signal(signal.SIGTERM)
    return launcher.communicate(timeout=120)[1]


def test_a_stopped_torchrun_resumes_to_the_same_bundle(runs):
    """SIGTERM to torchrun (it passes the signal to both ranks) after a resume point; --resume continues."""
    out = runs["root"] / "resumed"
    stderr = stopped_after_one_layer(runs["args"], out)
    if out.exists():
        pytest.skip("the run finished before the signal arrived")
    lines = ours(stderr)
    assert len(lines) == 1 and "run the same command with --resume" in lines[0], stderr
    done = run_torchrun(*runs["args"], "--out", out, "--resume", "--quiet")
    assert done.returncode == 0, done.stderr
    for shard in sorted(p.name for p in runs["single"].glob("model*.safetensors")):
        assert (runs["single"] / shard).read_bytes() == (out / shard).read_bytes(), shard
    report = json.loads((out / "quailora_report.json").read_text())
    assert report["calibration"]["world_size"] == 2 and len(report["modules"]) == 21


def test_resuming_with_another_number_of_processes_is_refused_in_one_line(runs):
    """A work folder from 2 ranks holds 2 activation files per layer: one process cannot continue it."""
    out = runs["root"] / "other-size"
    stopped_after_one_layer(runs["args"], out)
    if out.exists():
        pytest.skip("the run finished before the signal arrived")
    alone = run_cli(*runs["args"], "--out", out, "--resume")
    assert alone.returncode == 2
    lines = [line for line in alone.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "world_size: 2 -> null" in lines[0] and "--overwrite" in lines[0], alone.stderr


def _finish_rank(rank: int, port: int, settings: dict, outcomes) -> None:
    """One of two ranks (spawned): rank 0's ConversionDone listener raises; rank 1 gets SIGTERM while the
    ranks part after the bundle is published. Puts (rank, what convert did) on outcomes."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    from quailora_convert.convert.pipeline import convert
    from quailora_convert.convert.ranks import Ranks
    from quailora_convert.convert.settings import ConvertSettings
    from quailora_convert.events import ConversionDone
    from quailora_convert.stopping import stop_on_signals

    close = Ranks.close

    def signalled_close(self, error=None):
        if error is None and self.rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        return close(self, error)

    def listener(event):
        if isinstance(event, ConversionDone):
            raise RuntimeError("the listener failed")

    Ranks.close = signalled_close
    try:
        with stop_on_signals():
            out = convert(ConvertSettings(**settings), on_event=listener)
        outcomes.put((rank, f"returned {out}"))
    except BaseException as error:  # noqa: BLE001 - reported to the test
        outcomes.put((rank, f"raised {type(error).__name__}: {error}"))


def test_the_ranks_part_before_the_listener_hears_and_a_late_signal_is_dropped(runs):
    """Rank 0's ConversionDone listener runs after the ranks left the group (its error cannot leave rank 1
    waiting); a signal that reaches a rank after the bundle was published does not turn the run into a stop."""
    import multiprocessing
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = runs["root"] / "finish"
    source, calib = runs["args"][0], runs["args"][2]
    settings = dict(model=str(source), out=out, calib=str(calib), rank=8, num_samples=24, seq_len=48,
                    batch_size=4, device="cpu", max_shard_bytes=400_000)
    context = multiprocessing.get_context("spawn")
    outcomes = context.Queue()
    ranks = [context.Process(target=_finish_rank, args=(r, port, settings, outcomes)) for r in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=300)
        assert process.exitcode == 0, process.exitcode
    said = dict(outcomes.get(timeout=5) for _ in ranks)
    assert said == {0: "raised RuntimeError: the listener failed", 1: f"returned {out}"}
    for shard in sorted(p.name for p in runs["single"].glob("model*.safetensors")):
        assert (runs["single"] / shard).read_bytes() == (out / shard).read_bytes(), shard


def _parting_rank(rank: int, port: int, outcomes) -> None:
    """One of two ranks (spawned, gloo): a failure on rank 1, then a stop signal held on rank 0, each shared
    by together(); puts (rank, [(error type, shared mark)], whether close() waited at the barrier)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch.distributed as dist

    from quailora_convert.convert.ranks import join_ranks
    from quailora_convert.errors import SHARED_MARK
    from quailora_convert.stopping import stop_on_signals

    def fail_on_rank_1():
        if rank == 1:
            raise ValueError("rank 1's own failure")

    def signal_on_rank_0():
        if rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # held back (held_signals) until the together() below

    barriers = []
    barrier = dist.barrier
    dist.barrier = lambda *a, **k: (barriers.append(rank), barrier(*a, **k))[1]
    seen = []
    ranks = join_ranks(torch.device("cpu"))
    with stop_on_signals():
        for step in (fail_on_rank_1, signal_on_rank_0):
            try:
                with ranks.held_signals():
                    ranks.together(step)
            except BaseException as error:  # noqa: BLE001 - reported to the test
                seen.append((type(error).__name__, bool(getattr(error, SHARED_MARK, False))))
                last = error
        ranks.close(last)
    outcomes.put((rank, seen, barriers == [rank]))


def test_ranks_stopped_together_mark_the_error_and_wait_for_each_other_before_parting():
    """What every rank heard of at a together() (a peer's failure, a stop signal one rank got) is marked shared on
    every rank, so close() waits at a barrier before leaving the group (a rank that left first made its peer abort)."""
    import multiprocessing
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    outcomes = context.Queue()
    processes = [context.Process(target=_parting_rank, args=(r, port, outcomes)) for r in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0, process.exitcode
    said = {rank: (seen, waited) for rank, seen, waited in (outcomes.get(timeout=5) for _ in processes)}
    assert said == {0: ([("PeerFailed", True), ("StopRequested", True)], True),
                    1: ([("ValueError", True), ("StopRequested", True)], True)}
