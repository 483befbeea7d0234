"""One calibration record -> plain training-style text. Pure functions of a dict."""
from __future__ import annotations

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n{output}"
)
# A dialog turn's role -> its speaker tag (the Anthropic "\n\nHuman: ...\n\nAssistant: ..." style).
SPEAKERS = {"human": "Human", "user": "Human", "gpt": "Assistant", "assistant": "Assistant", "bot": "Assistant"}


def format_alpaca(record: dict) -> str:
    template = ALPACA_PROMPT if str(record.get("input") or "").strip() else ALPACA_PROMPT_NO_INPUT
    return template.format(
        instruction=record.get("instruction", ""), input=record.get("input", ""), output=record.get("output", ""),
    )


def format_text(record: dict) -> str:
    return str(record.get("text") or "").strip()


def format_prompt_completion(record: dict) -> str:
    """Self-Instruct: the prompt ends with 'Output:', the completion with GPT-3's end token."""
    completion = str(record.get("completion") or "").removesuffix("<|endoftext|>")
    return (str(record.get("prompt") or "") + completion).strip()


def format_chosen(record: dict) -> str:
    """hh-rlhf: the preferred dialog, already '\\n\\nHuman: ...\\n\\nAssistant: ...'."""
    return str(record.get("chosen") or "").strip()


def format_dialog(turns: list[dict]) -> str:
    """ShareGPT (`from`/`value`) or chat (`role`/`content`) turns as a Human/Assistant dialog.

    A system turn is the dialog's plain-text preamble; unknown roles keep their own name.
    """
    parts = []
    for turn in turns:
        role = str(turn.get("from", turn.get("role", ""))).lower()
        text = str(turn.get("value", turn.get("content", "")) or "").strip()
        if not text:
            continue
        parts.append(text if role == "system" else f"{SPEAKERS.get(role, role.capitalize() or 'Human')}: {text}")
    return "\n\n".join(parts)


def format_conversations(record: dict) -> str:
    return format_dialog(record.get("conversations") or [])
