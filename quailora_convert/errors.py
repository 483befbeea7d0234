"""Exceptions that carry a one-line, actionable message for the user."""


class QuailoraError(Exception):
    """Base of the errors the CLI prints as one line."""


class BadInputError(QuailoraError, ValueError):
    """The user asked for something that cannot work (missing file, bad option, ...)."""


class SourceMustChange(BadInputError):
    """Only another source can fix this (its values, found after the layers ran): a resume point cannot help."""


class UnsupportedModelError(QuailoraError):
    """The model's architecture or checkpoint format is outside what we convert."""


class ResumeRefused(BadInputError):
    """An interrupted run's state is in the way (or does not match); the message says the ways on."""


class Interrupted(QuailoraError):
    """A stop signal ended the run at a resume point; exit_code is the shell's 128 + signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class PeerFailed(QuailoraError):
    """torchrun: another rank failed the step this rank was in; its message, and the exit code to share."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


SHARED_MARK = "_quailora_shared_with_ranks"  # set on a rank's own error once every rank was told of it


def is_other_rank() -> bool:
    """Whether torchrun started this process as a rank other than 0 (read from its environment, no torch)."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and int(os.environ.get("RANK", "0") or 0) != 0


def is_quiet_rank(error: BaseException) -> bool:
    """Whether this process should print nothing for error: under torchrun, a rank other than 0 whose
    failure rank 0 reports (a PeerFailed, or its own error that every rank was told of), or that was
    stopped by a signal (torchrun passes it on to every rank; rank 0 says where to resume)."""
    from .stopping import StopRequested, stop_behind

    if not is_other_rank():
        return False
    return (isinstance(error, (PeerFailed, KeyboardInterrupt)) or bool(getattr(error, SHARED_MARK, False))
            or isinstance(stop_behind(error), StopRequested))
