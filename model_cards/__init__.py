"""Jinja model-card templates, installed as the `quailora_model_cards` package (see pyproject.toml)."""
