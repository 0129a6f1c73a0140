"""Incremental detokenization: after every token the text so far is the decode of the output
tokens cut before an incomplete character, deltas never carry a replacement character for a
character still being built, and stop strings cut the text exactly where they start.

Tokenizers: the tiny random model's byte-level BPE, and byte-fallback BPE and Unigram models
(`<0xE4>`-style byte tokens) built here, each through tokenizers' DecodeStream and through the
offset fallback that other tokenizers use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.detokenizer import IncrementalDetokenizer, find_stop

INCOMPLETE = "\ufffd"
CHINESE = "你好，世界！这是中文测试。"
FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466"  # man, woman, girl, boy
EMOJI = f"ok {FAMILY} 👍🏽 🇯🇵 done"
MIXED = f"hello 中文 world {FAMILY}!"
TEXTS = (CHINESE, EMOJI, MIXED)
WHOLE_CHARS = (
    "中文你好"  # byte-fallback vocabularies hold these as whole tokens; the rest fall back
)
VOCAB_SIZE = 500  # the tiny checkpoints' vocabulary (tests/engine/tiny_models)
MERGES = [
    ("▁", "h"),
    ("e", "l"),
    ("el", "l"),
    ("▁h", "ell"),
    ("▁hell", "o"),
    ("▁", "w"),
    ("o", "r"),
    ("▁w", "or"),
    ("l", "d"),
    ("▁wor", "ld"),
]


# ------------------------------------------------------------------ tokenizers


def _byte_fallback_pieces() -> list[str]:
    """Specials, the 256 byte tokens, "▁" and ASCII letters, whole CJK characters, then CJK
    filler up to VOCAB_SIZE (every id a model of that vocabulary samples decodes)."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["▁", *"abcdefghijklmnopqrstuvwxyz!,.", *WHOLE_CHARS, *(a + b for a, b in MERGES)]
    pieces += [chr(0x4E00 + i) for i in range(VOCAB_SIZE) if chr(0x4E00 + i) not in pieces]
    return pieces[:VOCAB_SIZE]


def _byte_fallback(kind: str) -> Any:
    """A Llama-2-style tokenizer (spaces as "▁", unknown characters as byte tokens) whose
    decoder has no strip step, so decoding does not depend on what precedes."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = _byte_fallback_pieces()
    if kind == "bpe":
        vocab = {p: i for i, p in enumerate(pieces)}
        model = models.BPE(vocab, MERGES, unk_token="<unk>", byte_fallback=True)
    else:
        model = models.Unigram([(p, -1.0) for p in pieces], unk_id=0, byte_fallback=True)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _tiny_random(directory: Path) -> Any:
    """The tiny random model's tokenizer (a byte-level BPE trained on an ASCII corpus, so CJK
    and emoji come out one byte per token), built with the model's own builder."""
    from transformers import AutoTokenizer

    from engine import demo_model

    build = getattr(demo_model, "build_tokenizer", None) or demo_model._build_tokenizer
    build(directory)
    return AutoTokenizer.from_pretrained(str(directory))


class SlowByteTokenizer:
    """Not a fast tokenizer: ids below 256 are UTF-8 bytes, 256 is a special token."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        special = b"" if skip_special_tokens else b"<eos>"
        raw = b"".join(special if t == 256 else bytes([t]) for t in ids if t <= 256)
        return raw.decode("utf-8", errors="replace")

    def encode(self, text: str) -> list[int]:
        return list(text.encode())


@pytest.fixture(scope="module")
def tiny_random(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return _tiny_random(tmp_path_factory.mktemp("tiny_random_tokenizer"))


@pytest.fixture(
    scope="module", params=["tiny-random", "byte-fallback-bpe", "byte-fallback-unigram", "slow"]
)
def tokenizer(request: pytest.FixtureRequest, tiny_random: Any) -> Any:
    return {
        "tiny-random": lambda: tiny_random,
        "byte-fallback-bpe": lambda: _byte_fallback("bpe"),
        "byte-fallback-unigram": lambda: _byte_fallback("unigram"),
        "slow": SlowByteTokenizer,
    }[request.param]()


# ------------------------------------------------------------------ the property


def _decode(tok: Any, ids: list[int]) -> str:
    return str(tok.decode(ids, skip_special_tokens=False))


def _readable(tok: Any, ids: list[int], upto: int) -> str:
    """decode(ids[:j]) for the largest j <= upto whose text does not end in an incomplete
    character: what a detokenizer may have shown after `upto` tokens."""
    for j in range(upto, -1, -1):
        text = _decode(tok, ids[:j])
        if not text.endswith(INCOMPLETE):
            return text
    return ""


def _check_stream(tok: Any, ids: list[int], split: int, *, valid_utf8: bool = True) -> str:
    """Feed ids[split:] after the prompt ids[:split], one token at a time; after each, the
    text is the readable decode of everything minus the prompt's readable text."""
    detok = IncrementalDetokenizer(tok, ids[:split], skip_special_tokens=False)
    assert detok.uses_decode_stream == (not isinstance(tok, SlowByteTokenizer))
    base = _readable(tok, ids, split)
    text = ""
    for k in range(split + 1, len(ids) + 1):
        delta = detok.add([ids[k - 1]])
        assert not (valid_utf8 and INCOMPLETE in delta), (k, delta)
        text += delta
        assert detok.text == text
        expected = _readable(tok, ids, k)
        assert expected.startswith(base), (split, k, expected)
        assert text == expected[len(base) :], (split, k, text, expected)
    return text


@pytest.mark.parametrize("text", TEXTS, ids=["chinese", "emoji", "mixed"])
def test_every_prefix_equals_the_full_decode(tokenizer, text):
    ids = list(tokenizer.encode(text))
    assert len(ids) > len(text) / 2  # multi-token characters in every case
    out = _check_stream(tokenizer, ids, 0)
    assert out == _decode(tokenizer, ids) and out.lstrip() == text  # byte fallback: a leading "▁"


@pytest.mark.parametrize("text", TEXTS, ids=["chinese", "emoji", "mixed"])
def test_after_a_prompt_split_anywhere(tokenizer, text):
    """Any boundary between prompt and output, inside a character too: the character that
    straddles it is emitted whole by the token that completes it (the disaggregated first
    token is such a prompt: prompt + first token, its text sent separately)."""
    ids = list(tokenizer.encode(text))
    for split in range(1, len(ids)):
        _check_stream(tokenizer, ids, split)


def test_split_character_is_held_back_then_emitted_whole(tokenizer):
    ids = list(tokenizer.encode("a" + FAMILY))
    detok = IncrementalDetokenizer(tokenizer, list(tokenizer.encode("x")), False)
    deltas = [detok.add([t]) for t in ids]
    assert "".join(deltas) == _decode(tokenizer, ids)
    assert "" in deltas  # the bytes of a code point waited for their last one
    assert all(INCOMPLETE not in d for d in deltas)


def test_random_token_ids_tiny_random(tiny_random):
    """Random ids from the tiny random model's vocabulary (invalid UTF-8 included: a genuinely
    invalid byte decodes to U+FFFD in the middle of the text, as tokenizer.decode has it)."""
    import random

    rng = random.Random(0)
    for seed in range(5):
        ids = [rng.randrange(len(tiny_random)) for _ in range(60)]
        _check_stream(tiny_random, ids, 7 + seed, valid_utf8=False)


def test_skip_special_tokens(tiny_random):
    eos = tiny_random.eos_token_id
    ids = list(tiny_random.encode("中 a")) + [eos] + list(tiny_random.encode("文"))
    detok = IncrementalDetokenizer(tiny_random, [eos], skip_special_tokens=True)
    text = "".join(detok.add([t]) for t in ids)
    assert text == tiny_random.decode(ids, skip_special_tokens=True) == "中 a文"


def test_clean_up_spaces_uses_the_offset_fallback():
    """transformers edits a WordPiece decode afterwards (clean_up_tokenization_spaces), which
    the stream cannot reproduce, so the offset decoder runs. It cleans up window by window, so
    spaces around punctuation may differ from a whole decode (they always did); no text is lost."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "do", "##n", "'", "t", "stop", ".", "it", "!"])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(cleanup=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", clean_up_tokenization_spaces=True
    )
    ids = fast.encode("don't stop it!")
    detok = IncrementalDetokenizer(fast, [vocab["it"]], skip_special_tokens=False)
    assert not detok.uses_decode_stream
    text = "".join(detok.add([t]) for t in ids)
    assert text.replace(" ", "") == fast.decode(ids).replace(" ", "") == "don'tstopit!"


def test_stream_failure_continues_on_the_offset_decoder(tiny_random):
    """DecodeStream raises (InvalidPrefix) mid-request: nothing emitted is lost or repeated."""
    ids = list(tiny_random.encode(MIXED))
    detok = IncrementalDetokenizer(tiny_random, list(tiny_random.encode("say:")), False)
    text = "".join(detok.add([t]) for t in ids[:9])

    class Broken:
        def step(self, tokenizer: Any, token_id: int) -> str | None:
            raise Exception("Invalid prefix encountered")  # noqa: TRY002 - what tokenizers raises

    detok._decoder._stream = Broken()  # type: ignore[attr-defined]
    text += "".join(detok.add([t]) for t in ids[9:])
    assert not detok.uses_decode_stream
    assert text == detok.text == MIXED


# ------------------------------------------------------------------ stop strings


def test_find_stop_earliest_inside_new_text():
    assert find_stop("abc中文def", 3, ("def", "文d")) == (4, "文d")
    assert find_stop("abc中文def", 2, ("abc",)) is None  # ended before the new text
    assert find_stop("x👍🏽y", 2, ("🏽y",)) == (2, "🏽y")


def test_invalid_byte_run_keeps_what_was_streamed():
    """Byte fallback: an invalid byte makes a batch decode rewrite its whole run of byte tokens
    ("i" given as <0x69>) as U+FFFD; the stream already showed "i" and keeps it."""
    tok = _byte_fallback("bpe")
    ids = [tok.convert_tokens_to_ids(t) for t in ("<0x69>", "<0xE4>", "中", "a")]
    assert tok.decode(ids) == "\ufffd\ufffd中a"
    detok = IncrementalDetokenizer(tok, list(tok.encode("x")), skip_special_tokens=False)
    assert [detok.add([t]) for t in ids] == ["i", "", "\ufffd中", "a"]


@pytest.fixture(scope="module")
def tiny_llm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.engine import tiny_models

    return tiny_models.build("llama31", tmp_path_factory.mktemp("tiny_llm"))


@pytest.fixture(scope="module", params=["tiny-random", "byte-fallback-bpe"])
def tiny_llm(request: pytest.FixtureRequest, tiny_llm_path: Path, tmp_path_factory) -> Any:
    """A tiny random Llama (vocabulary 500) with a tokenizer covering that vocabulary: its
    greedy output is random tokens, so multi-byte characters split over tokens, and invalid
    byte sequences, both occur."""
    import shutil

    from engine import LLM

    path = tmp_path_factory.mktemp(f"tiny_llm_{request.param}")
    for f in tiny_llm_path.iterdir():
        shutil.copy(f, path / f.name)
    if request.param == "tiny-random":
        _tiny_random(path)
    else:
        _byte_fallback("bpe").save_pretrained(str(path))
    llm = LLM(str(path), device="cpu", show_progress=False, max_model_len=256)
    yield llm
    llm.shutdown()


def test_stop_strings_are_exact(tiny_llm):
    """A stop string cuts the text exactly at its first occurrence (after it when included),
    wherever the token boundaries fall, and generation stops there."""
    from engine import SamplingParams

    llm = tiny_llm
    prompt = list(llm.tokenizer.encode("hello 中文"))
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    full = llm.generate([prompt], greedy)[0]
    if "\ufffd" not in full.text:  # an invalid byte run is the byte-fallback exception above
        assert full.text == _readable(llm.tokenizer, full.token_ids, len(full.token_ids))
    stops = [s for s in (full.text[4:6], full.text[9:10]) if s]
    assert stops
    cases = [(stop, include) for stop in stops for include in (False, True)]
    outs = llm.generate(
        [prompt] * len(cases),
        [
            SamplingParams(
                temperature=0.0,
                max_tokens=24,
                ignore_eos=True,
                stop=[stop],
                include_stop_str_in_output=include,
            )
            for stop, include in cases
        ],
    )
    for (stop, include), out in zip(cases, outs):
        cut = full.text.index(stop) + (len(stop) if include else 0)
        assert out.finish_reason == "stop" and out.stop_reason == stop
        assert out.text == full.text[:cut], (stop, out.text, full.text)
        assert out.token_ids == full.token_ids[: len(out.token_ids)]
