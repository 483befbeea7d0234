"""Stopping a long conversion on SIGTERM / SIGINT at a safe point, so that it can be resumed.

stop_on_signals() (the CLI enters it) turns both signals into StopRequested, raised in the main
thread. Inside critical() sections (a resume point being recorded, the bundle being renamed into
place) the signal is held back until the section ends. Without stop_on_signals(), SIGINT raises
KeyboardInterrupt as usual and SIGTERM kills the process; the resume state survives either way,
because it is only ever replaced atomically.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(BaseException):
    """A stop signal arrived; BaseException so that `except Exception` blocks let it through."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT


_state = {"critical": 0, "pending": None, "installed": False, "raised": None}


def _handler(signum, frame) -> None:
    if _state["critical"]:
        _state["pending"] = signum
        return
    _raise_stop(signum)


def _raise_stop(signum: int) -> None:
    raise stop_request(signum)


def stop_behind(error: BaseException) -> BaseException:
    """The stop a signal requested, when the code it interrupted replaced StopRequested with an error of
    its own; else error itself. The handler runs inside whatever Python frame is current, and C code
    that calls back into Python can swallow what it raises: torch, converting a storage safetensors
    hands it, turns it into "ValueError: could not determine the shape of object type ...".
    """
    if isinstance(error, StopRequested) or _state["raised"] is None:
        return error
    stop = StopRequested(_state["raised"])
    stop.__context__ = error
    return stop


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise StopRequested in this block (main thread only)."""
    previous = {s: signal.signal(s, _handler) for s in STOP_SIGNALS}
    _state["installed"] = True
    _state["raised"] = None
    try:
        yield
    finally:
        _state["installed"] = False
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def critical(finishes: bool = False) -> Iterator[None]:
    """A section a stop signal must not cut in two; a signal that arrives meanwhile stops right after it.

    finishes: the section completes the work (nothing is left to stop), so a signal held back is dropped.
    An error raised inside the section is never replaced by the held-back signal.
    """
    _state["critical"] += 1
    try:
        yield
    except BaseException:
        _state["critical"] -= 1
        if not _state["critical"]:
            _state["pending"] = None
        raise
    _state["critical"] -= 1
    if not _state["critical"] and _state["pending"] is not None:
        pending, _state["pending"] = _state["pending"], None
        if _state["installed"] and not finishes:
            _raise_stop(pending)


def take_held_signal() -> int | None:
    """The stop signal held back by the critical() sections around this point, if any, now forgotten (the
    caller stops by it: several processes agree first on when, see convert.ranks)."""
    pending, _state["pending"] = _state["pending"], None
    return pending if _state["installed"] else None


def stop_request(signum: int) -> StopRequested:
    """The StopRequested the signal handler raises for signum, recorded as raised (stop_behind), for the caller to
    raise (several processes that agreed on where to stop, see convert.ranks)."""
    _state["raised"] = signum
    return StopRequested(signum)
