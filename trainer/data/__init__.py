"""Datasets and what each row gives every model (ids, text prompts)."""
