"""benchmarks/memory.py measures the threading it says (tests run with OMP_NUM_THREADS=1; a user's CLI does not)."""
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from quailora_convert.convert import allocator

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"


@pytest.fixture(scope="module")
def bench() -> dict:
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARK.parent))  # as when run as a script: its sibling benchmarks/workplace.py
        return runpy.run_path(str(BENCHMARK))  # main() runs only as a script


def test_default_threads_unset_omp_num_threads_for_the_children(bench, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as conftest.py sets it
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    env = bench["child_environment"]("default")
    assert "OMP_NUM_THREADS" not in env and "MKL_NUM_THREADS" not in env
    assert bench["threading_label"](env) == "OMP_NUM_THREADS unset (torch's default)"
    assert os.environ["OMP_NUM_THREADS"] == "1"  # the parent's own environment is left alone
    assert bench["child_environment"]("env")["OMP_NUM_THREADS"] == "1"
    assert bench["child_environment"]("3")["OMP_NUM_THREADS"] == "3"


def test_torch_threads_probe_reports_the_childs_thread_count(bench, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert bench["torch_threads"](bench["child_environment"]("1")) == 1
    assert bench["torch_threads"](bench["child_environment"]("default")) >= 1


def test_bad_threads_value_is_a_usage_error():
    run = subprocess.run([sys.executable, str(BENCHMARK), "--threads", "two"], capture_output=True, text=True,
                         check=False)
    assert run.returncode == 2 and "--threads must be env, default or a positive integer" in run.stderr


def test_allocator_setting_is_a_no_op_off_linux(monkeypatch):
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.serve_large_blocks_from_mmap() is False


def test_allocator_setting_is_a_no_op_on_another_libc(monkeypatch):
    def no_such_name(name):
        raise ValueError(name)

    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.setattr(allocator.os, "confstr", no_such_name)  # musl: no CS_GNU_LIBC_VERSION
    assert allocator.serve_large_blocks_from_mmap() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_allocator_setting_applies_in_a_threaded_process():
    code = ("import torch; from quailora_convert.convert.allocator import serve_large_blocks_from_mmap; "
            "print(torch.get_num_threads(), serve_large_blocks_from_mmap())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # torch's default threading
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    threads, applied = run.stdout.split()
    assert int(threads) >= 1 and applied == "True"
