"""The names and defaults of the core's choices, importable without torch (the CLI's options read them)."""

SOLVERS = ("exact", "als", "svd")
DEFAULT_DAMP = 1e-6  # eigenvalue floor, relative to the mean eigenvalue of H
ROUNDINGS = ("nearest", "gptq")
DEFAULT_GPTQ_DAMP = 0.01  # added to H's diagonal before GPTQ's inverse, relative to its mean diagonal (GPTQ's percdamp)
# How the adapter's correction M is split into PEFT's two factors, M unchanged (core.lora.to_peft): balanced
# (U sqrt(S), sqrt(S) V^T), a-kaiming (A = V^T with PEFT's Kaiming-uniform row norm, B the rest), u (B = U S, A = V^T)
LORA_SPLITS = ("balanced", "a-kaiming", "u")
# NF4 block scales: bitsandbytes' absmax, or chosen per block under H (core.scales) among these fractions of it
SCALES = ("absmax", "calibrated")
SHRINK_FACTORS = tuple(round(1.0 - 0.05 * i, 2) for i in range(7))  # 1.0, 0.95, ..., 0.7
