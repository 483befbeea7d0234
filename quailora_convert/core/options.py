"""The names and defaults of the core's choices, importable without torch (the CLI's options read them)."""

SOLVERS = ("exact", "als", "svd")
DEFAULT_DAMP = 1e-6  # eigenvalue floor, relative to the mean eigenvalue of H
ROUNDINGS = ("nearest", "gptq")
DEFAULT_GPTQ_DAMP = 0.01  # added to H's diagonal before GPTQ's inverse, relative to its mean diagonal (GPTQ's percdamp)
