"""Structured output through xgrammar: the engine's one seam to it.

- `check_structured(structured)`: synchronous and cheap (the spec parsed into an xgrammar
  Grammar; no tokenizer, no compilation). Raises InvalidRequestError("structured", ...) with
  xgrammar's message trimmed to one clean line. The engine calls it when a request is added,
  before anything is allocated.
- `GrammarCompiler`: one per engine, for one vocabulary: the engine's Hugging Face tokenizer
  (`from_tokenizer`) or an explicit list of byte strings (`from_vocab`, for dummy-weight
  benchmarks). `state(structured)` returns a `GrammarState` at once; the grammar compiles in a
  small background ThreadPoolExecutor, never on the engine step. Compiled grammars are cached
  by (kind, spec) in an LRU of `cache_size` entries. xgrammar's TokenizerInfo is built on the
  first compilation, in the compile thread, so an engine that never sees a structured request
  never pays for it (nor imports xgrammar).
- `GrammarState`: one request's matcher, PENDING -> READY | FAILED -> FREED (see its doc).

JSON (json_schema and json_object) is compact (`any_whitespace=False`): a model may not loop
on whitespace. json_object is the schema {"type": "object"}.

Hazards: xgrammar objects are not shared between threads here: the compile threads only
produce CompiledGrammars (immutable), matchers live on the engine thread. A matcher never
crosses a process boundary: under tensor parallelism only rank 0 samples and the followers
never see a GrammarState.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

from engine.errors import InvalidRequestError
from engine.sampling_params import StructuredOutput

if TYPE_CHECKING:
    import torch
    import xgrammar as xgr

log = logging.getLogger(__name__)

DEFAULT_CACHE_SIZE = 64
DEFAULT_COMPILE_THREADS = 2
_MAX_MESSAGE_CHARS = 300
_JSON_OBJECT_SCHEMA = '{"type": "object"}'
# xgrammar's C++ errors open with "[hh:mm:ss] /path/file.cc:123: " and sometimes a failed
# check's text; neither helps the caller.
_XGR_PREFIX = re.compile(r"^\s*\[[\d:. ]+\]\s*\S+:\d+:\s*(Check failed:.*? is false:\s*)?")


def _xgr() -> Any:
    import xgrammar

    return xgrammar


def clean_message(message: str) -> str:
    """xgrammar's error text as one line without its source location, at most 300 chars."""
    text = " ".join(_XGR_PREFIX.sub("", message).split())
    if len(text) > _MAX_MESSAGE_CHARS:
        text = text[: _MAX_MESSAGE_CHARS - 3] + "..."
    return text or "invalid grammar"


def to_grammar(structured: StructuredOutput) -> xgr.Grammar:
    """The xgrammar Grammar of a StructuredOutput; raises xgrammar's error when it is invalid."""
    xgr = _xgr()
    if structured.kind == "json_schema":
        return xgr.Grammar.from_json_schema(structured.spec, any_whitespace=False)
    if structured.kind == "json_object":
        return xgr.Grammar.from_json_schema(_JSON_OBJECT_SCHEMA, any_whitespace=False)
    if structured.kind == "regex":
        return xgr.Grammar.from_regex(structured.spec)
    assert structured.kind == "ebnf", structured.kind
    return xgr.Grammar.from_ebnf(structured.spec)


def check_structured(structured: StructuredOutput) -> None:
    """Raise InvalidRequestError("structured", ...) unless xgrammar accepts the spec. A broken
    install (xgrammar or what it imports missing) is not the request's fault: it propagates."""
    xgr = _xgr()
    try:
        to_grammar(structured)
    except (RuntimeError, ValueError, xgr.InvalidJSONError) as exc:  # xgrammar's C++ errors
        raise InvalidRequestError(
            "structured", f"invalid {structured.kind}: {clean_message(str(exc))}"
        ) from None


class GrammarStatus(enum.Enum):
    PENDING = "pending"  # compiling in the background; the scheduler does not run it
    READY = "ready"  # the matcher exists; it constrains every sampled token
    FAILED = "failed"  # compilation failed or a token broke the grammar; `error` says why
    FREED = "freed"  # the request ended; the matcher is gone


class GrammarState:
    """One request's grammar. PENDING -> READY | FAILED; any -> FREED (`free()`, idempotent).

    Reconstructible from tokens: `num_accepted` counts the output tokens the matcher has
    accepted, and `catch_up(output_token_ids)` feeds it the ones it has not seen before each
    fill. A decode worker (whose request starts with the prompt and the first token sampled by
    the prefill worker) and a request recomputed after preemption need nothing else.
    Engine thread only; the compile thread only completes the future.
    """

    def __init__(self, compiled: Future[xgr.CompiledGrammar]) -> None:
        self._compiled: Future[xgr.CompiledGrammar] | None = compiled
        self._matcher: xgr.GrammarMatcher | None = None
        self._stop_ids: list[int] = []
        self._status = GrammarStatus.PENDING
        self.num_accepted = 0
        self.error: str | None = None

    @property
    def status(self) -> GrammarStatus:
        """Polls the compilation (non-blocking); builds the matcher once it is done."""
        if self._status is GrammarStatus.PENDING:
            assert self._compiled is not None
            if self._compiled.done():
                self._on_compiled(self._compiled)
        return self._status

    @property
    def ready(self) -> bool:
        return self.status is GrammarStatus.READY

    @property
    def pending_future(self) -> Future[xgr.CompiledGrammar] | None:
        """The compilation while PENDING (to wait on), else None."""
        return self._compiled if self.status is GrammarStatus.PENDING else None

    def _on_compiled(self, future: Future[xgr.CompiledGrammar]) -> None:
        self._compiled = None
        exc = None if future.cancelled() else future.exception()
        if future.cancelled() or exc is not None:
            self._fail(f"compiling the grammar failed: {clean_message(str(exc or 'cancelled'))}")
            return
        compiled = future.result()
        self._matcher = _xgr().GrammarMatcher(compiled)
        self._stop_ids = list(compiled.tokenizer_info.stop_token_ids)
        self._status = GrammarStatus.READY

    def _fail(self, error: str) -> None:
        self._matcher = None
        self.error = error
        self._status = GrammarStatus.FAILED

    @property
    def terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted: only stop tokens may follow."""
        return self._matcher is not None and self._matcher.is_terminated()

    def catch_up(self, output_token_ids: Sequence[int]) -> bool:
        """Accept the output tokens the matcher has not seen. False (and FAILED) when one
        breaks the grammar. Tokens after termination are stop tokens the request kept going
        past (ignore_eos): counted, not fed."""
        if self.status is not GrammarStatus.READY:
            return False
        matcher = self._matcher
        assert matcher is not None
        while self.num_accepted < len(output_token_ids):
            token = output_token_ids[self.num_accepted]
            if not matcher.is_terminated() and not matcher.accept_token(token):
                self._fail(
                    f"token {token} at output position {self.num_accepted} breaks the grammar"
                )
                return False
            self.num_accepted += 1
        return True

    @property
    def matcher(self) -> xgr.GrammarMatcher:
        """READY only; for the sampler's batched fill."""
        assert self._matcher is not None, f"no matcher while {self._status.value}"
        return self._matcher

    def fill_stop_only(self, bitmask: torch.Tensor, row: int) -> None:
        """Row `row` of a bitmask allows only the stop tokens (after termination)."""
        bitmask[row].zero_()
        for token in self._stop_ids:
            word, bit = divmod(token, 32)
            # int32 words: bit 31 is the sign bit, so set it through a signed value
            value = int(bitmask[row, word]) | (1 << bit)
            bitmask[row, word] = value - (1 << 32) if value >= 1 << 31 else value

    def free(self) -> None:
        """Drop the matcher (the request finished or was aborted). Idempotent; a compilation
        still running completes into the compiler's cache."""
        self._matcher = None
        self._compiled = None
        self._status = GrammarStatus.FREED


def wait_any(states: Sequence[GrammarState], timeout_s: float) -> None:
    """Block up to `timeout_s` until one PENDING state's compilation completes (GIL released)."""
    futures = [f for f in (s.pending_future for s in states) if f is not None]
    if futures:
        wait(futures, timeout=timeout_s, return_when=FIRST_COMPLETED)


class GrammarCompiler:
    """Compiles StructuredOutputs for one vocabulary off the engine thread, with an LRU cache.

    `make_tokenizer_info` builds xgrammar's TokenizerInfo; it runs once, in a compile thread.
    `state()` and `check()` are engine-thread calls (the cache is not locked).
    """

    def __init__(
        self,
        make_tokenizer_info: Callable[[], xgr.TokenizerInfo],
        cache_size: int = DEFAULT_CACHE_SIZE,
        num_threads: int = DEFAULT_COMPILE_THREADS,
    ) -> None:
        assert cache_size >= 1 and num_threads >= 1
        self._make_tokenizer_info = make_tokenizer_info
        self._xgr_compiler: xgr.GrammarCompiler | None = None
        self._build_lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], Future[xgr.CompiledGrammar]] = OrderedDict()
        self.cache_size = cache_size
        self._executor = ThreadPoolExecutor(num_threads, thread_name_prefix="grammar-compile")

    @staticmethod
    def from_tokenizer(
        tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]
    ) -> GrammarCompiler:
        """For a Hugging Face tokenizer; `vocab_size` is the model's logits width."""
        stops = list(stop_token_ids) or None

        def make() -> xgr.TokenizerInfo:
            return _xgr().TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=vocab_size, stop_token_ids=stops
            )

        return GrammarCompiler(make)

    @staticmethod
    def from_vocab(
        vocab: Sequence[bytes], vocab_size: int, stop_token_ids: Sequence[int]
    ) -> GrammarCompiler:
        """For an explicit vocabulary: `vocab[i]` is the bytes token i decodes to."""
        assert len(vocab) <= vocab_size, "the vocabulary is wider than the logits"
        pieces, stops = list(vocab), list(stop_token_ids)

        def make() -> xgr.TokenizerInfo:
            xgr = _xgr()
            return xgr.TokenizerInfo(
                pieces, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=stops
            )

        return GrammarCompiler(make)

    def check(self, structured: StructuredOutput) -> None:
        """The synchronous check (skipped for a spec already in the cache)."""
        if (structured.kind, structured.spec) not in self._cache:
            check_structured(structured)

    def state(self, structured: StructuredOutput) -> GrammarState:
        """A PENDING state whose grammar compiles in the background (or is cached)."""
        return GrammarState(self.compile(structured))

    def compile(self, structured: StructuredOutput) -> Future[xgr.CompiledGrammar]:
        key = (structured.kind, structured.spec)
        future = self._cache.get(key)
        if future is not None:
            self._cache.move_to_end(key)
            return future
        future = self._executor.submit(self._compile, structured)
        self._cache[key] = future
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return future

    @property
    def num_cached(self) -> int:
        return len(self._cache)

    def _compile(self, structured: StructuredOutput) -> xgr.CompiledGrammar:
        """In a compile thread: errors land in the future, and are logged."""
        try:
            return self._compiler().compile_grammar(to_grammar(structured))
        except Exception:
            log.exception("compiling a %s grammar failed", structured.kind)
            raise

    def _compiler(self) -> xgr.GrammarCompiler:
        with self._build_lock:
            if self._xgr_compiler is None:
                threads = max(1, min(8, (os.cpu_count() or 2) // 2))
                self._xgr_compiler = _xgr().GrammarCompiler(
                    self._make_tokenizer_info(), max_threads=threads, cache_enabled=False
                )
            return self._xgr_compiler

    def shutdown(self) -> None:
        """Stop the compile threads (queued compilations are cancelled). Idempotent."""
        self._executor.shutdown(wait=False, cancel_futures=True)
