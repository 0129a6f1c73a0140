"""Tokenizer and chat template through transformers.AutoTokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.errors import InvalidRequestError, ModelLoadError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_tokenizer(path: str | None) -> Any | None:
    """The checkpoint's tokenizer, or None when the directory has no tokenizer files
    (benchmarks with dummy weights feed token ids)."""
    if path is None:
        return None
    directory = Path(path)
    if not any((directory / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:  # transformers raises many kinds
        raise ModelLoadError(f"cannot load the tokenizer from {directory}: {exc}") from exc


def apply_chat_template(tokenizer: Any | None, messages: list[dict[str, str]]) -> list[int]:
    if tokenizer is None:
        raise InvalidRequestError("messages", "this model has no tokenizer; send token ids")
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("messages", "this model's tokenizer has no chat template")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)
