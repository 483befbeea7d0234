"""Exceptions that carry a one-line, actionable message for the user."""


class QuailoraError(Exception):
    """Base of the errors the CLI prints as one line."""


class BadInputError(QuailoraError, ValueError):
    """The user asked for something that cannot work (missing file, bad option, ...)."""


class UnsupportedModelError(QuailoraError):
    """The model's architecture or checkpoint format is outside what we convert."""


class ResumeRefused(BadInputError):
    """An interrupted run's state is in the way (or does not match); the message says the ways on."""


class Interrupted(QuailoraError):
    """A stop signal ended the run at a resume point; exit_code is the shell's 128 + signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
