"""Data-free calibration (`--calib self`): text the model itself samples from a few generic prompts.

The prompts below were written for this project (no third-party text). Each sample is one prompt,
wrapped in the tokenizer's chat template when it has one, followed by the model's seeded
nucleus-sampled continuation. Generation needs the whole full-precision model in memory (not the
layer-by-layer streaming of the conversion), so it is meant for small models: above
WARN_PARAMETERS a warning is logged, above MAX_PARAMETERS it is refused.

Held-out evaluation text (`eval --data self`) uses a disjoint prompt list and another seed.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Callable

import torch

from ..errors import BadInputError

log = logging.getLogger(__name__)
SELF = "self"
WARN_PARAMETERS = 2e9
MAX_PARAMETERS = 15e9
TEMPERATURE = 0.8
TOP_P = 0.95
HELDOUT_SEED_OFFSET = 10_007  # eval --data self never reuses the calibration seed

CALIBRATION_PROMPTS = [
    "Explain how a bicycle gear system works to someone who has never ridden one.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are three practical ways to reduce food waste at home?",
    "Describe the water cycle in simple terms.",
    "Write a Python function that returns the n-th Fibonacci number, and explain it.",
    "Give a friendly email asking a colleague to review a document by Friday.",
    "Summarise the main differences between a list and a dictionary in Python.",
    "What should someone pack for a three-day hiking trip in the mountains?",
    "Explain why the sky looks blue during the day and red at sunset.",
    "Write a poem about autumn leaves in four short stanzas.",
    "How do vaccines help the immune system recognise a disease?",
    "Plan a simple weekly budget for a student living alone.",
    "Describe how to make a cup of tea, step by step.",
    "What is the difference between weather and climate?",
    "Write a dialogue between a customer and a shop assistant about returning a jacket.",
    "Explain what a prime number is and list the first ten.",
]

HELDOUT_PROMPTS = [
    "Describe how bees make honey.",
    "Write a recipe for a vegetable soup and explain each step.",
    "What are the advantages and disadvantages of working from home?",
    "Explain how a refrigerator keeps food cold.",
    "Write a short letter thanking a teacher for their help.",
    "How does a search engine decide which pages to show first?",
    "Tell a story about a robot learning to paint.",
    "Explain the rules of chess for a complete beginner.",
]


def parameter_count(folder: Path) -> int:
    """Parameters of the model in folder, counted on the meta device (nothing loaded)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return sum(p.numel() for p in model.parameters())


def check_size(folder: Path) -> int:
    count = parameter_count(folder)
    if count > MAX_PARAMETERS:
        raise BadInputError(f"--calib self loads the whole model to generate text; {count / 1e9:.1f}B parameters is "
                            f"more than {MAX_PARAMETERS / 1e9:.0f}B: give a calibration file or preset instead")
    if count > WARN_PARAMETERS:
        log.warning("--calib self loads the whole %.1fB-parameter model in full precision to generate text",
                    count / 1e9)
    return count


def generate_texts(folder: Path, num_samples: int, max_new_tokens: int, seed: int,
                   prompts: list[str] = CALIBRATION_PROMPTS, batch_size: int = 16, device: str | torch.device = "cpu",
                   on_progress: Callable[[int, int], None] = lambda done, total: None) -> list[str]:
    """num_samples texts (prompt + sampled answer), reproducible for a seed on one machine."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if num_samples < 1 or max_new_tokens < 1:
        raise BadInputError("--num-samples and --seq-len must be positive")
    check_size(Path(folder))
    device = torch.device(device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.float32 if device.type == "cpu" else None  # CPU: float32 is the fast path
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "auto").to(device).eval()
    rng = random.Random(seed)
    order = [prompts[i % len(prompts)] for i in range(num_samples)]
    rng.shuffle(order)
    texts: list[str] = []
    for start in range(0, num_samples, batch_size):
        chunk = [_prompt_text(tokenizer, p) for p in order[start:start + batch_size]]
        encoded = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=not tokenizer.chat_template)
        with torch.random.fork_rng(devices=_cuda_indices(device)), torch.no_grad():  # the caller's RNG stays as it was
            torch.manual_seed(seed * 1_000_003 + start)
            output = model.generate(**encoded.to(device), do_sample=True, temperature=TEMPERATURE, top_p=TOP_P,
                                    top_k=0, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        for row, mask in zip(output, encoded["attention_mask"]):
            ids = row[int((mask == 0).sum()):]  # drop the left padding
            texts.append(tokenizer.decode(_strip_trailing_pad(ids, tokenizer.pad_token_id), skip_special_tokens=False))
        on_progress(len(texts), num_samples)
    del model
    return texts


def _cuda_indices(device: torch.device) -> list[int]:
    """The CUDA devices whose RNG sampling on device draws from (none on the CPU)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _prompt_text(tokenizer, prompt: str) -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
    return prompt + "\n"


def _strip_trailing_pad(ids: torch.Tensor, pad_id: int) -> list[int]:
    ids = ids.tolist()
    while len(ids) > 1 and ids[-1] == pad_id:
        ids.pop()
    return ids
