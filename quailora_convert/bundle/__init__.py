"""A bundle on disk: its layout (every file name, once), the streamed writer, and reading it back.

A bundle is a Hugging Face checkpoint folder (config.json with quantization_config, safetensors
shards, tokenizer files) plus a PEFT adapter and quailora-convert's own report, eval and card.
"""
