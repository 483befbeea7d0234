"""Calibration text, from wherever it comes, into padded token batches.

formats (one record -> training-style text: Alpaca, dialogs, ...), files (local .json/.jsonl/.txt),
hub_datasets (the paper's presets and any Hub dataset id), self_generated (text the model samples
itself, `--calib self`), texts (read_texts: which of those a --calib value names), batches
(seeded sampling, tokenisation, padding).
"""
