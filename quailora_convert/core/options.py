"""The names and defaults of the core's choices, importable without torch (the CLI's options read them)."""

SOLVERS = ("exact", "als", "svd")
DEFAULT_DAMP = 1e-6  # eigenvalue floor, relative to the mean eigenvalue of H
