"""The tokenizer a GGUF file describes, written as Hugging Face tokenizer files.

transformers rebuilds it from the file's vocabulary, merges, special tokens and chat template
(`AutoTokenizer.from_pretrained(..., gguf_file=...)`); saving it gives tokenizer.json,
tokenizer_config.json and chat_template.jinja, which `engine.tokenizer.load_tokenizer` reads
like any checkpoint's.
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import ModelLoadError
from engine.gguf.reader import GGUFCheckpoint


def has_tokenizer(checkpoint: GGUFCheckpoint) -> bool:
    return checkpoint.metadata("tokenizer.ggml.model") is not None


def write_tokenizer(checkpoint: GGUFCheckpoint, directory: Path) -> None:
    """Save `checkpoint`'s tokenizer into `directory`; a file without one writes nothing (the
    engine then takes token ids only)."""
    if not has_tokenizer(checkpoint):
        return
    from transformers import AutoTokenizer

    path = checkpoint.path
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        tokenizer.save_pretrained(str(directory))
    except Exception as exc:  # transformers raises many kinds
        raise ModelLoadError(f"{path}: cannot convert its tokenizer: {exc}") from exc
