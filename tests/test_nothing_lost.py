"""Nothing lost (issue 22): --out never overlaps what the run reads, a full disk is named and keeps the resume
point, and the advice after a damaged source file can be followed (a fixed file that only later layers read
resumes; one the finished layers read says --overwrite; any spelling of the source folder resumes).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_process import run_cli
from quailora_convert.bundle import safetensors_stream
from quailora_convert.bundle.layout import CARD, REPORT
from quailora_convert.convert import ConvertSettings, convert
from quailora_convert.convert.pipeline import dry_run
from quailora_convert.convert.work_folder import fingerprint, work_folder_for
from quailora_convert.errors import BadInputError
from quailora_convert.events import LayerConverted
from tiny_models import save_tiny, tiny_llama_config, write_text_calibration

FAST = ["--rank", "4", "--num-samples", "8", "--seq-len", "32", "--resume-interval", "0"]


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every file (its bytes) and symlink (its target) under folder, by relative path; symlinks not followed."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            key = str(path.relative_to(folder))
            if path.is_symlink():
                found[key] = "-> " + os.readlink(path)
            elif path.is_file():
                found[key] = path.read_bytes()
            else:
                found[key] = "dir"
    return found


# 1. --out over the source, its folder, or the calibration --------------------------------------------------------

@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A user's folder: the source m_base, an earlier bundle, notes, the calibration, a link to m_base."""
    home = tmp_path_factory.mktemp("overlap") / "home"  # its parent holds nothing else
    save_tiny(tiny_llama_config(), home / "m_base")
    (home / "old_bundle").mkdir()
    (home / "old_bundle" / "adapter_model.safetensors").write_bytes(b"an earlier bundle")
    (home / "notes.txt").write_text("my notes\n")
    (home / "data").mkdir()
    write_text_calibration(home / "data" / "calib.jsonl")
    (home / "link_to_m_base").symlink_to("m_base")
    return home


OVERLAPS = [  # (--out as typed in home, MODEL as typed, how --out relates to what the run reads)
    ("m_base", "m_base", "is the source model"),
    ("./m_base/", "m_base", "is the source model"),
    ("{home}/m_base", "./m_base", "is the source model"),
    ("link_to_m_base", "m_base", "is the source model"),
    ("m_base", "link_to_m_base", "is the source model"),
    (".", "m_base", "contains the source model"),
    ("..", "{home}/m_base", "contains the source model"),
    ("m_base/bundle", "m_base", "is inside the source model"),
    ("m_base/config.json", "m_base", "is inside the source model"),
    ("data", "m_base", "contains the calibration file"),
    ("data/calib.jsonl", "m_base", "is the calibration file"),
]


@pytest.mark.parametrize("out,model,relation", OVERLAPS, ids=[f"{o} for {m}" for o, m, _ in OVERLAPS])
def test_an_out_over_what_the_run_reads_is_refused_before_anything_is_touched(home, monkeypatch, out, model,
                                                                              relation):
    monkeypatch.chdir(home)
    before = snapshot(home.parent)
    out, model = out.format(home=home), model.format(home=home)
    settings = ConvertSettings(model=model, out=Path(out), calib="data/calib.jsonl", rank=4, num_samples=8,
                               seq_len=32, overwrite=True)
    for run in (convert, dry_run):
        with pytest.raises(BadInputError) as error:
            run(settings)
        message = str(error.value)
        assert message.startswith(f"--out {Path(out)} {relation} ") and "choose an --out that" in message, message
    assert snapshot(home.parent) == before  # byte for byte, and no work folder beside anything
    assert not work_folder_for(Path(out).resolve()).exists()


@pytest.mark.parametrize("out", ["m_base", "."])
def test_the_cli_refuses_an_out_over_the_source_in_one_line(home, out):
    before = snapshot(home.parent)
    result = run_cli("m_base", "--calib", "data/calib.jsonl", "--out", out, "--overwrite", *FAST, cwd=home)
    assert result.returncode == 2, (result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert errors[0].startswith(f"error: --out {out} ") and f"(MODEL; {home / 'm_base'})" in errors[0], errors[0]
    assert snapshot(home.parent) == before


# 6. The advice after a damaged source file ------------------------------------------------------------------------

def reshard(folder: Path, groups: list[list[int]]) -> None:
    """Rewrite folder's checkpoint as front.safetensors (everything outside the layers) and one file per group of
    decoder layers (layers-1-2.safetensors), with an index."""
    tensors = {}
    for shard in folder.glob("*.safetensors"):
        tensors.update(load_file(shard))
        shard.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    files = {"front.safetensors": {k: v for k, v in tensors.items() if ".layers." not in k}}
    for group in groups:
        name = "layers-" + "-".join(map(str, group)) + ".safetensors"
        files[name] = {k: v for k, v in tensors.items() if any(f".layers.{i}." in k for i in group)}
    weight_map = {}
    for name, part in files.items():
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))


def poison(shard: Path, key: str) -> bytes:
    """Set one value of key in shard to NaN; returns the shard's bytes before."""
    original = shard.read_bytes()
    tensors = load_file(shard)
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    return original


def same_weights_and_configs(a: Path, b: Path) -> None:
    """The bundles' files, byte for byte, but the report and card (they name the source as typed: item 3's)."""
    def files(bundle):
        return sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*")
                      if p.is_file() and p.name not in (REPORT, CARD))

    names = files(a)
    assert names == files(b) and any(name.endswith(".safetensors") for name in names), names
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture
def layered(tmp_path) -> tuple[Path, Path]:
    """(folder holding m_base: a 3-layer Llama, one shard per layer, and calib.jsonl; the bundle of an
    uninterrupted run at out)."""
    save_tiny(tiny_llama_config(num_hidden_layers=3), tmp_path / "m_base")
    reshard(tmp_path / "m_base", [[0], [1], [2]])
    write_text_calibration(tmp_path / "calib.jsonl")
    return tmp_path


KEY = "model.layers.2.input_layernorm.weight"


def test_a_fixed_shard_of_layers_not_yet_converted_resumes_under_any_spelling(layered):
    args = ["--calib", "calib.jsonl", "--out", "out", *FAST]
    reference = run_cli("m_base", *args, cwd=layered)
    assert reference.returncode == 0, reference.stderr
    (layered / "out").rename(layered / "reference")
    shard = layered / "m_base" / "layers-2.safetensors"
    original = poison(shard, KEY)

    failed = run_cli("m_base", *args, cwd=layered)
    assert failed.returncode == 2, (failed.stdout, failed.stderr)
    line = failed.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {KEY} in ") and "non-finite" in line, line
    assert "stopped at layer 3/3" in line and "fix layers-2.safetensors, then run the same command with --resume" in line

    shard.write_bytes(original)  # the fix
    resumed = run_cli(f"./m_base/", *args, "--resume", cwd=layered)  # noqa: F541 - another spelling
    assert resumed.returncode == 0, (resumed.stdout, resumed.stderr)
    shown = resumed.stdout + resumed.stderr
    assert "resuming at layer 3/3" in shown and "resuming with the changed layers-2.safetensors" in shown, shown
    same_weights_and_configs(layered / "out", layered / "reference")
    assert not work_folder_for(layered / "out").exists()


def test_a_fixed_shard_the_finished_layers_read_advises_overwrite_and_resume_agrees(layered):
    reshard(layered / "m_base", [[0], [1, 2]])  # layer 2 shares its file with the finished layer 1
    args = ["--calib", "calib.jsonl", "--out", "out", *FAST]
    shard = layered / "m_base" / "layers-1-2.safetensors"
    original = poison(shard, KEY)
    failed = run_cli("m_base", *args, cwd=layered)
    assert failed.returncode == 2, (failed.stdout, failed.stderr)
    line = failed.stderr.strip().splitlines()[-1]
    assert "layers-1-2.safetensors also holds tensors the finished layers were made from" in line, line
    assert line.endswith("run the same command with --overwrite") and "--resume" not in line, line
    shard.write_bytes(original)
    refused = run_cli("m_base", *args, "--resume", cwd=layered)  # what the advice said not to do
    assert refused.returncode == 2 and "cannot resume" in refused.stderr, refused.stderr
    assert (work_folder_for(layered / "out") / "state.json").exists()  # refused: nothing discarded


def test_the_fingerprint_names_a_local_source_and_calibration_resolved(layered, monkeypatch):
    monkeypatch.chdir(layered)
    prints = [fingerprint(dict(model=model, calib=calib, rank=4), layered / "m_base", None, None, None,
                          torch.device("cpu"))
              for model, calib in [("m_base", "calib.jsonl"), ("./m_base/", "./calib.jsonl"),
                                   (str(layered / "m_base"), str(layered / "calib.jsonl"))]]
    assert prints[0] == prints[1] == prints[2]
    assert prints[0]["settings"]["model"] == str(layered / "m_base")
    hub = fingerprint(dict(model="acme/tiny", calib="alpaca"), layered / "m_base", "acme/tiny", "abc", None,
                      torch.device("cpu"))
    assert hub["settings"]["model"] == "acme/tiny" and hub["settings"]["calib"] == "alpaca"


# 7. A full disk --------------------------------------------------------------------------------------------------

def test_a_full_disk_names_the_folder_and_keeps_the_resume_point(layered, monkeypatch):
    out = layered / "out"
    settings = dict(model=str(layered / "m_base"), out=out, calib=str(layered / "calib.jsonl"), rank=4,
                    num_samples=8, seq_len=32, resume_interval=0)
    convert(ConvertSettings(**settings))
    out.rename(layered / "reference")

    full = {"now": False}  # the disk fills once layer 1 is converted (a resume point after it)
    real_open = open

    class FullDisk:
        def __init__(self, file):
            self._file = file

        def write(self, data):
            if full["now"]:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self._file.write(data)

        def __getattr__(self, name):
            return getattr(self._file, name)

    monkeypatch.setattr(safetensors_stream, "open", lambda path, *a, **k: FullDisk(real_open(path, *a, **k)),
                        raising=False)

    def on_event(event):
        if isinstance(event, LayerConverted) and event.index == 0:
            full["now"] = True

    with pytest.raises(BadInputError) as error:
        convert(ConvertSettings(**settings), on_event=on_event)
    work = work_folder_for(out)
    message = str(error.value)
    assert message.startswith(f"no space left on the disk of {work / 'bundle'} while writing ") and \
        "bytes to write" in message and "bytes free" in message, message
    assert isinstance(error.value.__cause__, OSError) and error.value.__cause__.errno == errno.ENOSPC
    assert any("stopped at layer 2/3" in note and "--resume" in note for note in error.value.__notes__)
    assert json.loads((work / "state.json").read_text())["next_layer"] == 1  # the resume point is kept

    full["now"] = False  # space freed
    convert(ConvertSettings(**settings, resume=True))
    same_weights_and_configs(out, layered / "reference")


def test_a_full_disk_while_recording_a_resume_point_is_named(tmp_path, monkeypatch):
    from quailora_convert.convert.work_folder import WorkFolder

    work = WorkFolder(tmp_path / "out")
    work.acquire()

    def no_space(*args, **kwargs):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(BadInputError, match=rf"^over the disk quota on the disk of {work.path} while writing "
                                            r"state\.json \(\d[\d,]* bytes free\)"):
        work.record({"next_layer": 1}, {}, 1)
    monkeypatch.undo()
    work.release(remove=True)
    shutil.rmtree(work.path, ignore_errors=True)
