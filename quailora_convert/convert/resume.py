"""Who continues what: an interrupted run's state is resumed, refused or discarded.

A failed run leaves either a resume point (and says where) or nothing at all beside --out. A resume
accepts a source file that changed since (fixed, or a missing shard added) when it holds only layers
not yet converted: the finished layers and the captured activations never read it, so the bundle is
the one an uninterrupted run on the changed source writes.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

from ..errors import BadInputError, Interrupted, ResumeRefused, SourceMustChange
from ..events import Listener, Status
from ..sources.checkpoint import CheckpointReader, DamagedSourceError, KeyMap
from ..stopping import StopRequested, stop_behind
from .settings import ConvertSettings
from .work_folder import WorkFolder, differences, work_folder_for

OUTSIDE_LAYERS = -1  # source_layers: a file holding a tensor outside the decoder layers (copied at the start)


def refuse_overlaps(s: ConvertSettings, source_folder: Path | None = None) -> None:
    """One line, before anything is touched, when --out (or its work folder) is, holds, or lies inside what the
    run reads: MODEL (folder or .gguf file; source_folder: where a Hub model was downloaded) and a local --calib.
    Paths are compared by identity, so symlinks and other spellings of one place are caught."""
    reads = [("the source model", "MODEL", s.model), ("the calibration file", "--calib", s.calib)]
    if source_folder is not None:
        reads.append(("the source model", "downloaded", str(source_folder)))
    out = Path(s.out).expanduser()
    for target in (out, work_folder_for(out)):
        for what, option, value in reads:
            read = Path(value).expanduser()
            if not read.exists():  # a Hub id, a preset, 'self'
                continue
            relation = _overlap(target, read)
            if relation is not None:
                shown = f"--out {s.out}" if target == out else f"the work folder {target} of --out {s.out}"
                raise BadInputError(f"{shown} {relation} {what} {value} ({option}; {read.resolve()}): the run would "
                                    "write into or (--overwrite) delete what it reads; choose an --out that neither "
                                    "is, holds nor lies inside it")


def _overlap(target: Path, read: Path) -> str | None:
    """'is', 'contains' or 'is inside': how target (which may not exist) relates to the existing path read."""
    read_chain = [_place(p) for p in [read.resolve(), *read.resolve().parents]]
    target_chain = [_place(p) for p in [target.resolve(), *target.resolve().parents]]
    if target_chain[0] is not None and target_chain[0] == read_chain[0]:
        return "is"
    if target_chain[0] is not None and target_chain[0] in read_chain[1:]:
        return "contains"
    if read_chain[0] in target_chain[1:]:
        return "is inside"
    return None


def _place(path: Path) -> tuple[int, int] | None:
    """(device, inode) of an existing path: the same for every spelling of one place."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def source_file_layers(reader: CheckpointReader, key_map: KeyMap, layers_path: str) -> dict[str, int]:
    """Per source file, the first decoder layer whose tensors it holds (OUTSIDE_LAYERS for the embeddings, final
    norm, output head); a resume accepts a change to a file whose first layer is not converted yet."""
    first: dict[str, int] = {}
    prefix = layers_path + "."
    for key, filename in reader.key_to_file.items():
        if key not in key_map.to_model:  # not read (the report lists it as dropped)
            continue
        name = key_map.model_key(key)
        layer = int(name[len(prefix):].split(".", 1)[0]) if name.startswith(prefix) else OUTSIDE_LAYERS
        first[filename] = min(first.get(filename, layer), layer)
    return first


def refuse_existing_out(s: ConvertSettings) -> None:
    refuse_overlaps(s)
    out = Path(s.out)
    if out.exists() and not s.overwrite and (not out.is_dir() or any(out.iterdir())):
        raise BadInputError(f"--out {s.out} already exists; choose another folder or pass --overwrite")


def take_over(work: WorkFolder, s: ConvertSettings, on_event: Listener) -> dict | None:
    """The interrupted run's state to continue (--resume), or None after clearing the folder for a fresh start."""
    state = work.read_state()
    if state is not None and s.resume:
        on_event(Status(f"resuming at layer {state['next_layer'] + 1}/{state['layers']} from {work.path}"))
        return state
    if state is not None and not s.overwrite:
        raise ResumeRefused(f"an interrupted run's state is in {work.path} ({state['next_layer']}/{state['layers']} "
                            "layers done): run the same command with --resume to continue, or --overwrite to discard it")
    if state is not None:
        on_event(Status(f"--overwrite: discarding the interrupted run in {work.path}"))
    elif s.resume:
        on_event(Status(f"--resume: no interrupted run in {work.path}; starting from the first layer"))
    work.clear()
    return None


def leave(work: WorkFolder, error: BaseException) -> None:
    """After a failure: keep a resume point (and say so), else remove the work folder; always unlock.
    An error that a stop signal turned into (stopping.stop_behind) counts as that stop."""
    error = stop_behind(error)
    try:
        state = work.read_state()
    except BadInputError:  # unreadable or from another version: the message said --overwrite discards it
        work.release(remove=False)
        return
    if state is None:
        work.release(remove=True)
        if isinstance(error, StopRequested):
            raise Interrupted("interrupted before the first layer; nothing was kept", error.exit_code) from error
        return
    work.release(remove=False)
    at = f"layer {min(state['next_layer'] + 1, state['layers'])}/{state['layers']}"
    if isinstance(error, StopRequested):
        raise Interrupted(f"interrupted at {at}; run the same command with --resume to continue",
                          error.exit_code) from error
    if isinstance(error, ResumeRefused):
        return
    if isinstance(error, SourceMustChange):  # a fixed source is another source: resuming would be refused
        error.add_note(f"the unfinished run in {work.path} cannot be resumed from another source: convert the "
                       "fixed source with --overwrite")
        return
    damaged = error.path if isinstance(error, DamagedSourceError) else None
    if damaged is not None and not _resumable_change(state, damaged.name):
        error.add_note(f"stopped at {at}; {damaged.name} also holds tensors the finished layers were made from, so "
                       f"a resume would refuse the fixed file: fix it, then run the same command with --overwrite")
        return
    cause = f"fix {damaged.name}" if damaged is not None else "fix the cause"
    error.add_note(f"stopped at {at}; the finished layers are kept in {work.path}: {cause}, then run "
                   "the same command with --resume (or --overwrite to start over)")


def _resumable_change(state: dict, filename: str) -> bool:
    """Whether a resume from state accepts a change to the source file filename (see check_fingerprint)."""
    if "files" not in state["fingerprint"]["source"]:  # a Hub commit: the fixed file is the same commit's
        return True
    return state.get("source_layers", {}).get(filename, OUTSIDE_LAYERS) >= state["next_layer"]


def check_fingerprint(state: dict, prints: dict, work: WorkFolder, on_event: Listener = lambda event: None) -> None:
    """Refuse a resume whose source, settings or versions differ from the interrupted run's, but for source files
    that hold only layers not yet converted (fixed, or a missing shard added): those are accepted, re-checked as
    they are read, and the state takes the new fingerprint."""
    before, now = state["fingerprint"], prints
    old_files, new_files = before["source"].get("files", {}), now["source"].get("files", {})
    changed = sorted(name for name in old_files.keys() | new_files.keys() if old_files.get(name) != new_files.get(name))
    accepted = [name for name in changed if _resumable_change(state, name)]
    if accepted:
        before, now = copy.deepcopy(before), copy.deepcopy(now)
        for name in accepted:
            before["source"]["files"].pop(name, None)
            now["source"]["files"].pop(name, None)
    found = differences(before, now)
    if found:
        shown = "; ".join(found[:3]) + (f"; and {len(found) - 3} more" if len(found) > 3 else "")
        raise ResumeRefused(f"cannot resume {work.path}: {shown}. Run it with what it was started with, or pass "
                            "--overwrite instead of --resume to start over")
    if accepted:
        on_event(Status(f"resuming with the changed {', '.join(accepted)}: only layers from {state['next_layer'] + 1} "
                        "on, not converted yet, are read from it"))
        state["fingerprint"] = prints
