"""Who continues what: an interrupted run's state is resumed, refused or discarded.

A failed run leaves either a resume point (and says where) or nothing at all beside --out.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import BadInputError, Interrupted, ResumeRefused
from ..events import Listener, Status
from ..stopping import StopRequested, stop_behind
from .settings import ConvertSettings
from .work_folder import WorkFolder, differences


def refuse_existing_out(s: ConvertSettings) -> None:
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
    if not isinstance(error, ResumeRefused):
        error.add_note(f"stopped at {at}; the finished layers are kept in {work.path}: fix the cause, then run "
                       "the same command with --resume (or --overwrite to start over)")


def check_fingerprint(state: dict, prints: dict, work: WorkFolder) -> None:
    found = differences(state["fingerprint"], prints)
    if found:
        shown = "; ".join(found[:3]) + (f"; and {len(found) - 3} more" if len(found) > 3 else "")
        raise ResumeRefused(f"cannot resume {work.path}: {shown}. Run it with what it was started with, or pass "
                            "--overwrite instead of --resume to start over")
