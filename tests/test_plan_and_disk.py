"""--dry-run's plan against the real run, the disk preflight, and the shard writer's disk needs (tmpfs)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from cli_process import run_cli
from tiny_models import save_tiny, tiny_llama_config, write_text_calibration

PLAN_KEYS = {"peak_host_bytes", "peak_device_bytes", "bundle_bytes", "disk_bytes", "seconds"}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("plan")
    folder = save_tiny(tiny_llama_config(num_hidden_layers=4), root / "source")
    calib = write_text_calibration(root / "calib.jsonl", count=32)
    args = [folder, "--calib", calib, "--rank", 8, "--num-samples", 16, "--seq-len", 32]
    return dict(root=root, args=args)


def _plan(source: dict, out: Path) -> dict:
    done = run_cli(*source["args"], "--out", out, "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_dry_run_writes_nothing_and_its_estimates_hold(source):
    before = sorted(p.name for p in source["root"].iterdir())
    plan = _plan(source, source["root"] / "planned")
    assert PLAN_KEYS <= set(plan) and plan["layers"] == 4 and plan["targeted_modules"] == 28
    assert sorted(p.name for p in source["root"].iterdir()) == before  # no bundle, no work folder

    out = source["root"] / "planned"
    done = run_cli(*source["args"], "--out", out, "--quiet")
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "quailora_report.json").read_text())
    actual = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())  # quailora_init/ holds the adapter
    assert abs(plan["bundle_bytes"] / actual - 1) < 0.10, (plan["bundle_bytes"], actual)
    # Within 35% on a quiet machine (benchmarks: SmolLM2 and the memory models); a loaded one grows the real heap
    assert 0.5 < plan["peak_host_bytes"] / report["peak_rss_bytes"] < 1.5, (plan, report["peak_rss_bytes"])
    assert plan["calibration_tokens"] == report["calibration"]["tokens"]
    assert plan["seconds"] > 0 and plan["peak_device_bytes"] == 0  # CPU: the device is the host


def test_an_absurd_rank_is_refused_before_any_work(source):
    done = run_cli(*source["args"], "--out", source["root"] / "absurd", "--rank", 100000)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: --rank 100000 exceeds every targeted module (the largest holds rank 128); "
                                   "use --rank 128 or less")
    assert not (source["root"] / "absurd").exists()
    assert not (source["root"] / "absurd.quailora-work").exists()


def _mount_tmpfs(folder: Path, size: int) -> None:
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for the disk-full cases needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


@pytest.fixture
def small_disk(tmp_path):
    mounted = []

    def mount(size: int) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        _mount_tmpfs(folder, size)
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=False)


def test_a_full_disk_is_refused_before_any_work_naming_folder_and_bytes(source, small_disk):
    plan = _plan(source, source["root"] / "unused")
    disk = small_disk(plan["disk_bytes"] // 2)
    done = run_cli(*source["args"], "--out", disk / "out")
    assert done.returncode == 2
    line = done.stderr.strip()
    assert line.startswith(f"error: not enough disk space in {disk}: the bundle and its work folder need ~"), line
    assert "bytes" in line and "free" in line
    assert list(disk.iterdir()) == []  # nothing left behind


def test_the_shard_writer_needs_no_more_disk_than_the_shard(source, small_disk):
    """Room for the bundle and the work folder, not for a second copy of the (single) base shard."""
    plan = _plan(source, source["root"] / "unused")
    base_shard = plan["bundle_bytes"] * 0.6
    size = int(plan["disk_bytes"] * 1.15)
    assert size < plan["disk_bytes"] + base_shard  # a writer that copies its shard would not fit
    disk = small_disk(size)
    done = run_cli(*source["args"], "--out", disk / "out", "--quiet")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in disk.iterdir()) == ["out"]
