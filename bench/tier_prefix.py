"""Time to first token of a 4k-token prompt whose prefix sits in the CPU tier, against
recomputing it (Llama-3-8B shape, dummy bf16, one GPU).

    python bench/tier_prefix.py

A small HBM pool (so the prompt's blocks get evicted), a pinned CPU tier under it. Measures:
cold TTFT (full prefill), then after other prompts pushed the prefix out of HBM into the CPU
tier, the TTFT of the same prompt served from the tier (load + the last block's prefill).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, sync, write_json  # noqa: E402
from bench.engine import random_prompts  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from kvtransfer.cache_view import KVCacheView  # noqa: E402
from kvtransfer.tiers.engine_cache import TieredEngineCache  # noqa: E402
from kvtransfer.tiers.store import TieredStore  # noqa: E402

PROMPT = 4096
ONE = SamplingParams(temperature=0.0, max_tokens=1)


def ttft(llm: LLM, prompt: list[int], rid: str) -> float:
    engine = llm.engine
    sync()
    start = time.perf_counter()
    engine.add_request(rid, prompt, ONE)
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - start


def main() -> None:
    llm = LLM("preset:llama-3-8b", load_format="dummy", dtype="bfloat16", show_progress=False,
              num_kv_blocks=700, max_model_len=8192, enforce_eager=False)
    view = KVCacheView(llm.engine.runner.kv_cache)
    store = TieredStore(view, model_salt=llm.engine.kv_manager.salt, cpu_bytes=400 * view.bytes_per_block())
    cache = TieredEngineCache(store, view)
    llm.engine.attach_external_cache(cache)
    vocab = llm.engine.vocab_size
    warm = random_prompts(1, 512, vocab, 99)[0]
    ttft(llm, warm, "warm")
    cold, tiered = [], []
    for i in range(3):
        prompt = random_prompts(1, PROMPT, vocab, i)[0]
        cold.append(ttft(llm, prompt, f"cold{i}"))
        for j, filler in enumerate(random_prompts(3, 4000, vocab, 100 + i)):  # push it out of HBM
            ttft(llm, filler, f"fill{i}-{j}")
        store.flush()
        before = llm.engine.kv_manager.external_hit_tokens
        tiered.append(ttft(llm, prompt, f"tier{i}"))
        assert llm.engine.kv_manager.external_hit_tokens - before >= PROMPT - 32, "the prefix did not come from the tier"
    c, t = statistics.median(cold), statistics.median(tiered)
    print_table(f"{PROMPT}-token prompt: TTFT (ms, median of 3)", ["recompute", "prefix in CPU tier", "ratio", "target"],
                [[f"{c * 1e3:.1f}", f"{t * 1e3:.1f}", f"{t / c:.2f}x", "<= 0.2x"]])
    write_json("tier_prefix", {"recompute_s": cold, "cpu_tier_s": tiered})
    store.close()


if __name__ == "__main__":
    main()
