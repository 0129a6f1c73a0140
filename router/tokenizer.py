"""Tokenization in the router: prompt text or chat messages -> token ids.

`HfTokenizer` loads a checkpoint's fast tokenizer (tokenizer.json + tokenizer_config.json, the
chat template included) through `transformers.PreTrainedTokenizerFast`. Hazard: it deliberately
avoids `AutoTokenizer`, whose import pulls in torch (transformers 5 imports
`modeling_rope_utils`), and the router must not import torch. Checkpoints that ship only a slow
(sentencepiece) tokenizer are therefore not supported by the router.

`ByteTokenizer` (UTF-8 bytes as ids) needs no files: tests and benchmarks use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from engine.errors import InvalidRequestError


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


class Tokenizer(Protocol):
    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_chat(self, turns: Sequence[ChatTurn], add_generation_prompt: bool) -> list[int]:
        """Apply the chat template. Raises InvalidRequestError('chat', ...) if there is none."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """Token id = UTF-8 byte; ids 256.. are specials (256 = EOS). Chat: "role: content\\n" lines."""

    EOS = 256

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return (self.EOS,)

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def encode_chat(self, turns: Sequence[ChatTurn], add_generation_prompt: bool) -> list[int]:
        text = "".join(f"{t.role}: {t.content}\n" for t in turns)
        return self.encode(text + ("assistant: " if add_generation_prompt else ""))

    def decode(self, token_ids: Sequence[int]) -> str:
        return bytes(t for t in token_ids if t < 256).decode(errors="replace")


class HfTokenizer:
    """A Hugging Face fast tokenizer from a local checkpoint directory."""

    def __init__(self, model_path: str | Path) -> None:
        from transformers import PreTrainedTokenizerFast  # heavy: imported only when used

        self._tok: Any = PreTrainedTokenizerFast.from_pretrained(str(model_path))
        self._vocab_size = len(self._tok)
        eos = self._tok.eos_token_id
        self._eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=True))

    def encode_chat(self, turns: Sequence[ChatTurn], add_generation_prompt: bool) -> list[int]:
        if not self._tok.chat_template:
            raise InvalidRequestError("chat", "the model has no chat template; send text instead")
        messages = [{"role": t.role, "content": t.content} for t in turns]
        try:
            out = self._tok.apply_chat_template(
                messages,
                add_generation_prompt=add_generation_prompt,
                tokenize=True,
                return_dict=False,
            )
        except Exception as exc:  # template errors (e.g. role order) come from user input
            raise InvalidRequestError(
                "chat", f"the chat template rejected the messages: {exc}"
            ) from exc
        return list(out)

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(token_ids), skip_special_tokens=True))
