"""A conversion's resume state: one work folder beside --out, owned (flock) by the run writing it.

    OUT.quailora-work/
      owner.json                        pid and start time of the run holding the lock
      state.json                        the last resume point (replaced atomically: the commit)
      calibration.safetensors           the token batches (a resumed run never re-reads or re-samples)
      activations-00012.safetensors     the inputs of the next layer to convert (here layer 12); under torchrun
                                        one file per rank, activations-00012-rank1-of-2.safetensors
      bundle/                           the bundle being written; renamed to OUT at the end

After every finished layer commit() syncs the bundle's files, writes the next layer's inputs, then
replaces state.json: a kill at any instant leaves the previous or the new resume point, never a mix.
A finished run renames bundle/ into place and removes the folder; nothing else is ever left beside --out.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open

from ..bundle.safetensors_stream import SafetensorsStreamWriter, disk_full_named, header_bytes_for
from ..calibration.batches import CalibrationBatch
from ..errors import BadInputError
from ..sources.fingerprint import source_files_fingerprint
from ..stopping import critical
from .settings import RUN_ONLY_SETTINGS

WORK_SUFFIX = ".quailora-work"
STATE = "state.json"
OWNER = "owner.json"
CALIBRATION = "calibration.safetensors"
BUNDLE = "bundle"
STATE_FORMAT = 4  # 2: the ranks' shares (torchrun); 3: shares by padded positions (Ranks.share); 4: quailora_init/


def work_folder_for(out: Path) -> Path:
    out = Path(out).resolve()
    return out.with_name(out.name + WORK_SUFFIX)


class WorkFolder:
    def __init__(self, out: Path):
        self.out = Path(out).resolve()
        self.path = work_folder_for(self.out)
        self.bundle = self.path / BUNDLE
        self._lock_fd: int | None = None
        self._out_identity: tuple | None = None

    # -- ownership ---------------------------------------------------------------------------
    def acquire(self) -> None:
        """The exclusive lock on the work folder (created if need be); refuses at once if another run holds it."""
        for _ in range(3):
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise BadInputError(f"another quailora-convert run ({self._owner()}) is writing --out {self.out} "
                                    f"(lock: {self.path}); wait for it to finish or choose another --out") from None
            if _same_file(self.path, fd):
                self._lock_fd = fd
                self._out_identity = _identity(self.out)
                _write_json_atomic(self.path / OWNER, {"pid": os.getpid(), "started": time.time()})
                return
            os.close(fd)  # a finishing run removed this folder between our mkdir and flock: take a new one
        raise BadInputError(f"could not lock {self.path}: it keeps being removed by another run")

    def _owner(self) -> str:
        try:
            return f"pid {json.loads((self.path / OWNER).read_text())['pid']}"
        except (OSError, ValueError, KeyError):
            return "pid unknown"

    def release(self, remove: bool) -> None:
        """Unlock; with remove, delete the folder first (while still holding the lock)."""
        if self._lock_fd is None:
            return
        if remove:
            shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock_fd)
        self._lock_fd = None

    # -- resume points -----------------------------------------------------------------------
    def read_state(self) -> dict | None:
        try:
            state = json.loads((self.path / STATE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise BadInputError(f"{self.path / STATE} is unreadable ({e}); pass --overwrite to discard it") from e
        if state.get("format") != STATE_FORMAT:
            raise BadInputError(f"{self.path} was written by another version of quailora-convert; pass --overwrite "
                                "to discard it")
        return state

    def clear(self) -> None:
        """Everything but the owner file: a fresh start."""
        for path in self.path.iterdir():
            if path.name != OWNER:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()

    def save_calibration(self, batches: list[CalibrationBatch]) -> None:
        tensors = {}
        for b, batch in enumerate(batches):
            tensors[f"{b}.input_ids"] = batch.input_ids
            tensors[f"{b}.attention_mask"] = batch.attention_mask
        _write_tensors(self.path / CALIBRATION, tensors)

    def load_calibration(self) -> list[CalibrationBatch]:
        tensors = _read_tensors(self.path / CALIBRATION)
        return [CalibrationBatch(tensors[f"{b}.input_ids"], tensors[f"{b}.attention_mask"])
                for b in range(len(tensors) // 2)]

    def load_activations(self, state: dict, rank: int = 0, world_size: int = 1) -> list[torch.Tensor]:
        tensors = _read_tensors(self.path / activations_name(state["next_layer"], rank, world_size))
        return [tensors[str(b)] for b in range(len(tensors))]

    # -- a resume point: each rank's activations (one rank alone, or several under torchrun), then rank 0's state
    def save_activations(self, next_layer: int, hidden: list[torch.Tensor], rank: int, world_size: int) -> None:
        """One rank's share of the next layer's inputs (a file of its own; the folder is rank 0's)."""
        with critical():
            _write_tensors(self.path / activations_name(next_layer, rank, world_size),
                           {str(b): h for b, h in enumerate(hidden)})

    def record(self, state: dict, bundle_state: dict, world_size: int) -> None:
        """Rank 0, once every rank saved its activations: the state, then the earlier ranks' files removed."""
        names = {activations_name(state["next_layer"], rank, world_size) for rank in range(world_size)}
        with critical():
            _write_json_atomic(self.path / STATE, {"format": STATE_FORMAT, **state,
                                                   "activations": activations_name(state["next_layer"], 0, world_size),
                                                   "bundle": bundle_state})
            for stale in self.path.glob("activations-*"):
                if stale.name not in names:
                    stale.unlink()

    # -- the end -----------------------------------------------------------------------------
    def publish(self, overwrite: bool) -> Path:
        """Rename bundle/ to --out (replacing what was there only under --overwrite), remove the folder, unlock."""
        with critical(finishes=True):
            if _identity(self.out) != self._out_identity:
                raise BadInputError(f"--out {self.out} was changed by another program while this run worked; "
                                    f"this run's bundle is kept in {self.bundle}")
            if self._out_identity is not None:
                if overwrite:
                    os.rename(self.out, self.path / "replaced")
                elif self.out.is_dir() and not any(self.out.iterdir()):
                    self.out.rmdir()  # an empty folder named as --out
                else:
                    raise BadInputError(f"--out {self.out} already exists; choose another folder or pass --overwrite")
            os.rename(self.bundle, self.out)
            (self.path / STATE).unlink()  # the bundle is in place: nothing is left to resume
            _fsync_folder(self.out.parent)
            self.release(remove=True)
        return self.out


def activations_name(next_layer: int, rank: int = 0, world_size: int = 1) -> str:
    """activations-00012.safetensors; with several ranks activations-00012-rank1-of-2.safetensors."""
    shared = "" if world_size == 1 else f"-rank{rank}-of-{world_size}"
    return f"activations-{next_layer:05d}{shared}.safetensors"


def fingerprint(settings: dict, source_folder: Path, repo_id: str | None, commit: str | None,
                gguf: str | None, device: torch.device) -> dict:
    """What a resumed run must share with the interrupted one to give the same bytes."""
    import bitsandbytes
    import peft
    import transformers

    from .. import __version__

    if commit is not None:
        source = {"repo_id": repo_id, "commit": commit}
    else:
        source = source_files_fingerprint(source_folder, gguf)  # each file's size and the sha256 of its ends
    ignored = {*RUN_ONLY_SETTINGS, "out"}
    settings = {**settings, "model": _resolved(settings["model"]), "calib": _resolved(settings["calib"])}
    return {
        "source": source,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items() if k not in ignored},
        "device": _device_identity(device),
        "versions": {"quailora_convert": __version__, "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
    }


def _resolved(value: str) -> str:
    """A local path as its absolute, resolved spelling (m_base, ./m_base and /abs/m_base are one source); a Hub id,
    preset or 'self' as given."""
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def _device_identity(device: torch.device) -> dict:
    """What the numerics depend on: the device kind, and on CUDA the GPU model and library versions."""
    if device.type != "cuda":
        return {"type": device.type}
    return {"type": "cuda", "name": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version()}


def differences(before: dict, after: dict, prefix: str = "") -> list[str]:
    """'settings.rank: 32 -> 64' for every leaf that differs."""
    found = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found += differences(old, new, f"{prefix}{key}.")
        elif old != new:
            found.append(f"{prefix}{key}: {_short(old)} -> {_short(new)}")
    return found


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def _identity(path: Path) -> tuple | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def _same_file(path: Path, fd: int) -> bool:
    try:
        a, b = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with disk_full_named(tmp.parent, path.name), open(tmp, "w") as f:
        f.write(json.dumps(data, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_folder(path.parent)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    writer = SafetensorsStreamWriter(tmp, header_bytes_for(list(tensors)))
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    writer.close()
    with disk_full_named(tmp.parent, path.name), open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, RuntimeError) as e:
        raise BadInputError(f"{path} is damaged ({e}); pass --overwrite to start over") from e
