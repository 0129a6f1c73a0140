"""A prefix that travelled HBM -> CPU tier -> NVMe tier and back gives the same greedy tokens,
and a corrupted NVMe block is a miss (recomputed), never a wrong hit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from kvtransfer.cache_view import KVCacheView
from kvtransfer.tiers.engine_cache import TieredEngineCache
from kvtransfer.tiers.placement import Tier
from kvtransfer.tiers.store import TieredStore
from tests.engine import tiny_models

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, min_tokens=16)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.build("llama31", tmp_path_factory.mktemp("tiny"))


def _prompts() -> tuple[list[int], list[list[int]]]:
    gen = torch.Generator().manual_seed(11)
    target = torch.randint(3, 500, (200,), generator=gen).tolist()
    fillers = [torch.randint(3, 500, (150,), generator=gen).tolist() for _ in range(4)]
    return target, fillers


def _tiered_llm(path: Path, nvme_dir: Path) -> tuple[LLM, TieredStore]:
    llm = LLM(str(path), device="cpu", show_progress=False, num_kv_blocks=24)  # 23 usable blocks
    view = KVCacheView(llm.engine.runner.kv_cache)
    per_block = view.bytes_per_block()
    store = TieredStore(
        view,
        model_salt=llm.engine.kv_manager.salt,
        cpu_bytes=4 * per_block,
        nvme_dir=nvme_dir,
        nvme_bytes=64 * per_block,
    )
    llm.engine.attach_external_cache(TieredEngineCache(store, view))
    return llm, store


def _evict_target(llm: LLM, store: TieredStore, fillers: list[list[int]]) -> None:
    """Other prompts take every HBM block: the target's cached blocks spill to the tiers."""
    llm.generate(fillers, GREEDY)
    store.flush()


def test_prefix_from_cpu_and_nvme_tiers_gives_identical_tokens(
    checkpoint: Path, tmp_path: Path
) -> None:
    target, fillers = _prompts()
    reference = (
        LLM(str(checkpoint), device="cpu", show_progress=False)
        .generate([target], GREEDY)[0]
        .token_ids
    )
    llm, store = _tiered_llm(checkpoint, tmp_path / "nvme")
    assert llm.generate([target], GREEDY)[0].token_ids == reference
    _evict_target(llm, store, fillers)
    hits_before = llm.engine.kv_manager.external_hit_tokens
    again = llm.generate([target], GREEDY)[0]
    stats = store.stats()
    assert again.token_ids == reference
    assert (
        llm.engine.kv_manager.external_hit_tokens - hits_before >= 8 * 16
    )  # most of the 12 prefix blocks
    assert stats[Tier.NVME].hits > 0 and stats[Tier.CPU].hits + stats[Tier.NVME].hits >= 8
    llm.engine.scheduler.kv.pool.check_integrity()
    store.close()


def test_corrupted_nvme_block_is_a_miss(checkpoint: Path, tmp_path: Path) -> None:
    target, fillers = _prompts()
    reference = (
        LLM(str(checkpoint), device="cpu", show_progress=False)
        .generate([target], GREEDY)[0]
        .token_ids
    )
    llm, store = _tiered_llm(checkpoint, tmp_path / "nvme")
    llm.generate([target], GREEDY)
    _evict_target(llm, store, fillers)
    files = sorted(p for p in (tmp_path / "nvme").rglob("*") if p.is_file())
    assert files, "nothing spilled to the NVMe tier"
    for f in files:  # flip one byte in every block file
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    assert llm.generate([target], GREEDY)[0].token_ids == reference
    llm.engine.scheduler.kv.pool.check_integrity()
    store.close()
