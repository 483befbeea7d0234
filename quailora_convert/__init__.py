"""quailora-convert: full-precision causal LM -> bitsandbytes base + QuAILoRA-initialised PEFT adapter."""

__version__ = "0.1.0"
