"""Exceptions that carry a one-line, actionable message for the user."""


class QuailoraError(Exception):
    """Base of the errors the CLI prints as one line."""


class BadInputError(QuailoraError, ValueError):
    """The user asked for something that cannot work (missing file, bad option, ...)."""


class UnsupportedModelError(QuailoraError):
    """The model's architecture or checkpoint format is outside what we convert."""
