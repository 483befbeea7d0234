"""The numerical core: tensors in, tensors out.

solvers (low-rank compensation), hessian (H = X X^T accumulation), quantize (bitsandbytes NF4 and
int8, exactly as transformers' loader reads them), lora (PEFT's adapter convention). Imports torch
and bitsandbytes only; never transformers, files or the Hub.
"""
