"""Speculative decoding on CUDA: greedy tokens with the n-gram proposer equal those without, in
float32, for a tiny Llama-3.1 checkpoint, with CUDA graphs on (verify steps of decode rows
replay the decode graphs) and off. Prints one line per case; exits non-zero on a mismatch."""

from __future__ import annotations

import gc
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import LLM, SamplingParams  # noqa: E402
from tests.engine import tiny_models  # noqa: E402


def main() -> int:
    path = tiny_models.build("llama31", Path(tempfile.mkdtemp()))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (3, 17, 40, 70, 300)]
    prompts.append(list(range(10, 30)) * 3)
    params = SamplingParams(temperature=0.0, max_tokens=64)
    failed = 0
    for eager in (False, True):
        common = dict(device="cuda", dtype="float32", show_progress=False, enforce_eager=eager)
        plain = LLM(str(path), **common)
        want = [o.token_ids for o in plain.generate(prompts, params)]
        del plain  # its KV cache must go before the next engine sizes its own
        gc.collect()
        torch.cuda.empty_cache()
        spec = LLM(
            str(path), speculative_config={"method": "ngram", "num_speculative_tokens": 4}, **common
        )
        have = [o.token_ids for o in spec.generate(prompts, params)]
        sched = spec.engine.scheduler
        same = sum(a == b for a, b in zip(want, have))
        print(
            f"eager={eager}: {same}/{len(prompts)} sequences equal; drafts "
            f"{sched.num_draft_tokens_total}, accepted {sched.num_accepted_tokens_total}"
        )
        del spec, sched
        gc.collect()
        torch.cuda.empty_cache()
        failed += same != len(prompts)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
