"""Incremental detokenization and stop-string search, one request at a time.

Contract of `IncrementalDetokenizer` (every decoder below keeps it):
- `add(ids)` returns the text the new tokens made readable; `text` is the concatenation of
  every delta so far (the engine may truncate it at a stop string).
- No replacement character (U+FFFD) is emitted for a character that is still incomplete: a
  multi-byte character split over several tokens (byte-level BPE, byte-fallback `<0xE4>`
  tokens, emoji and their ZWJ sequences) is held back until the token that completes it.
- After k output tokens, `text` equals the decode of those tokens in the context of the
  prompt, cut before a trailing incomplete character. For tokenizers whose decoding does not
  depend on what precedes (byte-level BPE, byte fallback without a strip step) that is exactly
  `tokenizer.decode(output_ids[:k])`; SentencePiece decoders that strip a leading space
  keep it here, as the text that follows the prompt. A character that never completes (the
  request ends in its middle) is never emitted.
- Exception, byte-fallback decoders only: a batch decode turns a whole run of byte tokens into
  U+FFFD once any byte of the run is invalid, rewriting characters of that run that were
  already valid and streamed. Streamed text cannot be taken back: it keeps them, and the
  invalid bytes become U+FFFD after them. Valid UTF-8 output is never affected.

Two decoders:
- `_StreamDecoder`: tokenizers' `DecodeStream` (Rust) for fast tokenizers, where decoding is
  the backend's alone (no Python-side clean-up of spaces, which the stream cannot reproduce).
- `_OffsetDecoder`: prefix / read offsets over `tokenizer.decode`, for every other tokenizer,
  and where the stream reports an inconsistent prefix (it then takes over mid-request).
Both decode only a short window of recent tokens, so each step costs O(1) in the text length.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)

Decode = Callable[[list[int]], str]

_INCOMPLETE = "\ufffd"
MIN_CONTEXT = 4  # prompt tokens priming a decoder (the next token's leading space depends on them)
MAX_CONTEXT = 24  # ... grown until the window starts on a character boundary, up to this many
MAX_PENDING = 4  # tokens of one incomplete character at most (UTF-8: 4 bytes, a token each)


class _Decoder(Protocol):
    def add(self, token_ids: list[int]) -> str: ...


class IncrementalDetokenizer:
    """One request's text, built token by token (see the module docstring for the contract)."""

    def __init__(
        self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool
    ) -> None:
        """`prompt_token_ids`: what precedes the first token added (the prompt, plus any output
        tokens whose text is already accounted for elsewhere, e.g. a first token)."""
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        context = _prompt_context(self._decode, list(prompt_token_ids))
        backend = _stream_backend(tokenizer)
        self._decoder: _Decoder = (
            _StreamDecoder(backend, self._decode, context, skip_special_tokens)
            if backend is not None
            else _OffsetDecoder(self._decode, context)
        )

    @property
    def uses_decode_stream(self) -> bool:
        """Whether tokenizers' DecodeStream does the work (False: the offset fallback)."""
        return isinstance(self._decoder, _StreamDecoder) and not self._decoder.fell_back

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens))

    def add(self, new_token_ids: list[int]) -> str:
        """Append tokens; return the newly readable text (possibly empty)."""
        delta = self._decoder.add(list(new_token_ids))
        self.text += delta
        return delta


def _prompt_context(decode: Decode, prompt_ids: list[int]) -> list[int]:
    """The prompt's last tokens that prime a decoder: a window of MIN_CONTEXT to MAX_CONTEXT
    tokens whose text neither starts nor ends inside a character, plus the tokens after it
    (at most MAX_PENDING - 1: a trailing incomplete character, which the output token that
    completes it emits whole). Byte-fallback decoders turn a whole run of byte tokens into
    U+FFFD when any of it is invalid, so the window must not cut a run's character either."""
    for n in range(MIN_CONTEXT, MAX_CONTEXT + 1):
        for cut in range(min(MAX_PENDING, len(prompt_ids))):
            end = len(prompt_ids) - cut
            start = max(0, end - n)  # the prompt's own start is a character boundary
            text = decode(prompt_ids[start:end])
            if (start == 0 or not text.startswith(_INCOMPLETE)) and not text.endswith(_INCOMPLETE):
                return prompt_ids[start:]
        if n >= len(prompt_ids):
            break
    return prompt_ids[-MIN_CONTEXT:]


def _stream_backend(tokenizer: Any) -> Any | None:
    """The `tokenizers.Tokenizer` behind `tokenizer` when DecodeStream reproduces its decode,
    else None (no DecodeStream in this tokenizers version, a slow tokenizer, or transformers
    would clean up spaces after the backend's decode)."""
    try:
        from tokenizers import Tokenizer
        from tokenizers.decoders import DecodeStream  # noqa: F401 - tokenizers >= 0.21
    except ImportError:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer) or _cleans_up_spaces(tokenizer, backend):
        return None
    return backend


def _cleans_up_spaces(tokenizer: Any, backend: Any) -> bool:
    """Whether transformers' decode edits the backend's text (`clean_up_tokenization_spaces`).
    Transformers 5 skips that clean-up for BPE models unless forced; its forcing flag exists
    only in those versions, so its presence says which rule applies."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    force = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"
    is_bpe = type(backend.model).__name__ == "BPE"
    return not (is_bpe and hasattr(tokenizer, force) and not getattr(tokenizer, force))


class _OffsetDecoder:
    """Keeps a window of ids whose first `read` are already emitted; emits what decoding the
    whole window adds to decoding those, unless it ends in an incomplete character. After an
    emission the window starts at the old `read` (the previous token or so: context for the
    next one's leading space) and every id in it counts as read."""

    def __init__(self, decode: Decode, context: list[int]) -> None:
        self._decode = decode
        self._ids = list(context)
        self._read = _complete_prefix_len(decode, self._ids)

    def add(self, token_ids: list[int]) -> str:
        self._ids.extend(token_ids)
        prefix = self._decode(self._ids[: self._read])
        full = self._decode(self._ids)
        if len(full) <= len(prefix) or full.endswith(_INCOMPLETE):
            return ""
        del self._ids[: self._read]  # keeps the window (and each step's decode) short
        self._read = len(self._ids)
        return full[len(prefix) :]


def _complete_prefix_len(decode: Decode, ids: list[int]) -> int:
    """The length of the longest prefix of `ids` (dropping at most MAX_PENDING - 1 tokens)
    whose text does not end in an incomplete character: the tokens after it are unread, so
    the token that completes their character emits it whole."""
    for cut in range(min(MAX_PENDING, len(ids) + 1)):
        if not decode(ids[: len(ids) - cut]).endswith(_INCOMPLETE):
            return len(ids) - cut
    return len(ids)


class _StreamDecoder:
    """tokenizers' DecodeStream, primed with the prompt context (its text is dropped).

    The stream raises if a window's text does not extend the previous one (InvalidPrefix;
    possible with decoders that rewrite earlier text). The request then continues on
    `_OffsetDecoder`, from the last token whose text was emitted: no text is lost or repeated.
    """

    def __init__(
        self, backend: Any, decode: Decode, context: list[int], skip_special_tokens: bool
    ) -> None:
        from tokenizers.decoders import DecodeStream

        self._backend = backend
        self._decode = decode
        self._stream: Any = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._fallback: _OffsetDecoder | None = None
        self._emitted: list[int] = []  # recent tokens whose text is emitted (a window)
        self._pending: list[int] = []  # tokens after them, held back
        self._feed(context)  # primes the stream; the prompt's own text is not output

    @property
    def fell_back(self) -> bool:
        return self._fallback is not None

    def add(self, token_ids: list[int]) -> str:
        return self._feed(token_ids)

    def _feed(self, token_ids: list[int]) -> str:
        if self._fallback is not None:
            return self._fallback.add(token_ids)
        parts = []
        for i, token_id in enumerate(token_ids):
            try:
                parts.append(self._step(token_id))
            except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception
                log.warning(
                    "DecodeStream failed (%s); the request goes on with the offset decoder", err
                )
                self._fallback = _OffsetDecoder(self._decode, self._emitted)
                parts.append(self._fallback.add(self._pending + token_ids[i + 1 :]))
                break
        return "".join(parts)

    def _step(self, token_id: int) -> str:
        self._pending.append(token_id)
        chunk = self._stream.step(self._backend, token_id)
        if chunk is None:
            return ""
        self._emitted = (self._emitted + self._pending)[-MAX_CONTEXT:]
        self._pending = []
        return str(chunk)


def find_stop(text: str, new_chars: int, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """The earliest stop string that ends inside the last `new_chars` characters of `text`:
    (index where it starts, the string), or None."""
    best: tuple[int, str] | None = None
    for stop in stops:
        start = max(0, len(text) - new_chars - len(stop) + 1)
        i = text.find(stop, start)
        if i != -1 and (best is None or i < best[0]):
            best = (i, stop)
    return best
