"""Fault injection on the command line: kill -9 / SIGTERM / SIGINT mid-run, then --resume; concurrent runs.

A resumed bundle must be byte-identical to an uninterrupted one. Both write to the same --out path
(the reference is moved aside first), so even the files that name the path can be compared.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_process import run_cli
from quailora_convert.bundle.layout import INIT_ADAPTER_WEIGHTS
from tiny_models import save_tiny, tiny_llama_config, write_text_calibration

LAYERS = 6
VOLATILE_REPORT_KEYS = ("timings", "peak_rss_bytes")


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict:
    """A 6-layer source, its calibration, and the bundle an uninterrupted run makes of it."""
    root = tmp_path_factory.mktemp("resume")
    config = tiny_llama_config(hidden_size=256, intermediate_size=640, num_hidden_layers=LAYERS, head_dim=64)
    source = save_tiny(config, root / "source")
    calib = write_text_calibration(root / "calib.jsonl", count=32)
    args = [source, "--calib", calib, "--rank", 8, "--num-samples", 24, "--seq-len", 48, "--batch-size", 4,
            "--max-shard-bytes", 400_000, "--resume-interval", 0]  # a resume point after every layer
    out = root / "out"
    done = run_cli(*args, "--out", out, "--quiet")
    assert done.returncode == 0, done.stderr
    reference = root / "reference"
    out.rename(reference)
    return dict(root=root, args=args, out=out, reference=reference)


def _start(case: dict, *extra) -> subprocess.Popen:
    console = shutil.which("quailora-convert")
    command = [console] if console else [sys.executable, "-m", "quailora_cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(command + [str(a) for a in case["args"]] + ["--out", str(case["out"]), *map(str, extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _work(case: dict) -> Path:
    return case["out"].with_name(case["out"].name + ".quailora-work")


def _wait_for_layers(case: dict, process: subprocess.Popen, layers: int, timeout: float = 240) -> None:
    """Until the run has recorded a resume point after `layers` layers."""
    state = _work(case) / "state.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the run ended before layer {layers}: {process.communicate()}"
        try:
            if json.loads(state.read_text())["next_layer"] >= layers:
                return
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.01)
    raise AssertionError("no resume point in time")


def _assert_same_bundle(a: Path, b: Path) -> None:
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())  # quailora_init/ too
    assert names == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert INIT_ADAPTER_WEIGHTS in names
    for name in names:
        if name == "quailora_report.json":
            left, right = (json.loads((x / name).read_text()) for x in (a, b))
            for key in VOLATILE_REPORT_KEYS:
                left.pop(key), right.pop(key)
            assert left == right
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _clean(case: dict) -> None:
    shutil.rmtree(case["out"], ignore_errors=True)
    shutil.rmtree(_work(case), ignore_errors=True)


def test_kill_9_then_resume_gives_identical_bytes(case):
    _clean(case)
    process = _start(case)
    _wait_for_layers(case, process, 2)
    process.kill()
    process.wait()
    assert not case["out"].exists() and (_work(case) / "state.json").exists()

    refused = run_cli(*case["args"], "--out", case["out"])
    assert refused.returncode == 2
    line = refused.stderr.strip().splitlines()[-1]
    assert str(_work(case)) in line and "--resume" in line and "--overwrite" in line and f"/{LAYERS} layers" in line

    resumed = run_cli(*case["args"], "--out", case["out"], "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at layer" in resumed.stdout
    _assert_same_bundle(case["out"], case["reference"])
    assert not _work(case).exists()  # a finished run removes its work folder
    beside = {p.name for p in case["out"].parent.iterdir()}
    assert beside == {"source", "calib.jsonl", "out", "reference"}


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_at_a_resume_point(case, signum, code):
    _clean(case)
    process = _start(case)
    _wait_for_layers(case, process, 1)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted at layer ") and last.endswith(
        f"/{LAYERS}; run the same command with --resume to continue"), last
    assert (_work(case) / "state.json").exists() and not case["out"].exists()

    resumed = run_cli(*case["args"], "--out", case["out"], "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_bundle(case["out"], case["reference"])


@pytest.mark.parametrize("interval, resume_points", [(3600, [0]), (0, list(range(LAYERS)))])
def test_resume_points_come_at_the_interval(case, monkeypatch, interval, resume_points):
    """--resume-interval: the first resume point (before layer 1) always, then one whenever the interval has
    passed (0: after every layer but the last, which the finish follows); the bytes never depend on it."""
    from quailora_convert.convert.pipeline import convert
    from quailora_convert.convert.settings import ConvertSettings
    from quailora_convert.convert.work_folder import WorkFolder

    _clean(case)
    recorded = []
    record = WorkFolder.record  # the state of a resume point, written once its activations are saved

    def recording(self, state, *args):
        recorded.append(state["next_layer"])
        return record(self, state, *args)

    monkeypatch.setattr(WorkFolder, "record", recording)
    source, calib = case["args"][0], case["args"][2]
    convert(ConvertSettings(model=str(source), out=case["out"], calib=str(calib), rank=8, num_samples=24, seq_len=48,
                            batch_size=4, max_shard_bytes=400_000, resume_interval=interval))
    assert recorded == resume_points
    _assert_same_bundle(case["out"], case["reference"])


def test_a_signal_while_a_resume_point_is_written_keeps_that_point(case, monkeypatch):
    """A stop that arrives while the activations are saved takes effect once the state names them: the run
    resumes from that very point (not the one before), and the bytes are the uninterrupted run's."""
    from quailora_convert.convert.pipeline import convert
    from quailora_convert.convert.settings import ConvertSettings
    from quailora_convert.convert.work_folder import WorkFolder
    from quailora_convert.errors import Interrupted
    from quailora_convert.stopping import stop_on_signals

    _clean(case)
    save = WorkFolder.save_activations

    def signalled_while_saving(self, next_layer, *args):
        if next_layer == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs here, inside the resume point's critical section
        return save(self, next_layer, *args)

    monkeypatch.setattr(WorkFolder, "save_activations", signalled_while_saving)
    source, calib = case["args"][0], case["args"][2]
    settings = dict(model=str(source), out=case["out"], calib=str(calib), rank=8, num_samples=24, seq_len=48,
                    batch_size=4, max_shard_bytes=400_000, resume_interval=0)
    with stop_on_signals(), pytest.raises(Interrupted, match="interrupted at layer 3/6"):
        convert(ConvertSettings(**settings))
    state = json.loads((_work(case) / "state.json").read_text())
    assert state["next_layer"] == 2 and (_work(case) / state["activations"]).exists()
    assert not case["out"].exists()

    monkeypatch.setattr(WorkFolder, "save_activations", save)
    convert(ConvertSettings(**settings, resume=True))
    _assert_same_bundle(case["out"], case["reference"])


def test_resume_refuses_other_settings_in_one_line(case):
    _clean(case)
    process = _start(case)
    _wait_for_layers(case, process, 1)
    process.kill()
    process.wait()
    args = [a if a != 8 else 4 for a in case["args"]]  # --rank 4 instead of 8
    refused = run_cli(*args, "--out", case["out"], "--resume")
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "settings.rank: 8 -> 4" in lines[0] and "--overwrite" in lines[0], lines
    assert (_work(case) / "state.json").exists()  # refused: nothing discarded

    fresh = run_cli(*args, "--out", case["out"], "--overwrite", "--quiet")  # discards the state, starts over
    assert fresh.returncode == 0, fresh.stderr
    assert not _work(case).exists()


def test_a_second_run_on_the_same_out_refuses_at_once(case):
    _clean(case)
    first = _start(case)
    _wait_for_layers(case, first, 1)
    first.send_signal(signal.SIGSTOP)  # holds its lock, however slow the second run is to start
    try:
        started = time.monotonic()
        second = run_cli(*case["args"], "--out", case["out"], "--overwrite")
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2 and time.monotonic() - started < 60
    assert "another quailora-convert run (pid" in second.stderr and str(case["out"]) in second.stderr
    assert first.wait(timeout=240) == 0, first.communicate()
    _assert_same_bundle(case["out"], case["reference"])  # the first run's bundle, untouched


def test_overwrite_replaces_a_file_and_leaves_nothing_behind(case):
    _clean(case)
    case["out"].write_text("not a bundle\n")
    done = run_cli(*case["args"], "--out", case["out"], "--overwrite", "--quiet")
    assert done.returncode == 0, done.stderr
    _assert_same_bundle(case["out"], case["reference"])
    assert {p.name for p in case["out"].parent.iterdir()} == {"source", "calib.jsonl", "out", "reference"}


def test_an_empty_out_folder_is_filled_without_overwrite(case):
    _clean(case)
    case["out"].mkdir()
    done = run_cli(*case["args"], "--out", case["out"], "--quiet")
    assert done.returncode == 0, done.stderr
    _assert_same_bundle(case["out"], case["reference"])


def test_stop_signals_outside_the_layer_loop_and_held_back_ones():
    """A signal inside a critical section waits for its end; a finishing section drops it; an error wins."""
    from quailora_convert.stopping import StopRequested, critical, stop_on_signals

    with stop_on_signals():
        with pytest.raises(StopRequested) as stopped:
            with critical():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler ran here and held the signal back
            pytest.fail("the held-back signal must stop right after the section")
        assert stopped.value.exit_code == 143
        with critical(finishes=True):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        with pytest.raises(OSError, match="disk full"):
            with critical():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                raise OSError("disk full")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_stop_that_c_code_turned_into_its_own_error_is_still_the_stop():
    """The handler raises in whatever frame is current; torch, converting a storage for safetensors, replaces
    that with "ValueError: could not determine the shape of object type 'torch.storage.UntypedStorage'"."""
    from quailora_convert.stopping import StopRequested, stop_behind, stop_on_signals

    def converting_code():  # stands for C code calling back into Python and then raising its own error
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler raises StopRequested here
        except StopRequested:
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None
        pytest.fail("the handler must have raised")

    with stop_on_signals():
        error = ValueError("an ordinary error, before any signal")
        assert stop_behind(error) is error
        with pytest.raises(ValueError) as converted:
            converting_code()
        stop = stop_behind(converted.value)
        assert isinstance(stop, StopRequested) and stop.exit_code == 143
        assert stop.__context__ is converted.value
    with stop_on_signals():  # a new run starts with no stop on record
        assert stop_behind(error) is error
