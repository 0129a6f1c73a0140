"""The KVCacheSpec in use: the runner allocates and sizes from it, kv_cache_dtype changes it (not
the model dtype), KVCacheView / the handle / the tiers derive from it, and the runner calls the
attention backend's `plan` once per step with the metadata every layer then gets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.attention.backend import AttentionBackend, AttentionMetadata
from engine.attention.select import get_attention_backend
from engine.attention.torch_backend import TorchAttentionBackend
from engine.config import EngineConfig
from engine.errors import EngineConfigError
from engine.kv.spec import KVCacheSpec, LayerScales
from engine.runner.kv_cache import allocate_kv_cache
from kvtransfer.cache_view import KVCacheView, TPLayout
from kvtransfer.errors import KVLayoutError
from kvtransfer.handle import KVHandle, KVLayout
from kvtransfer.sender import view_layout
from kvtransfer.tiers.store import TieredStore
from kvtransfer.tp_view import TPGroupKVView
from tests.engine import tiny_models

GREEDY = SamplingParams(temperature=0.0, max_tokens=6)
SPEC = KVCacheSpec(num_layers=2, num_kv_heads=4, head_dim=16, block_size=8, kv_dtype="float16")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.build("llama31", tmp_path_factory.mktemp("tiny"))


def _llm(path: Path, **kwargs: object) -> LLM:
    return LLM(str(path), device="cpu", show_progress=False, **kwargs)


def test_runner_allocates_and_sizes_from_the_spec(checkpoint: Path) -> None:
    budget = 1 << 20
    llm = _llm(checkpoint, kv_cache_bytes=budget)
    engine, spec = llm.engine, llm.engine.kv_spec
    cfg = engine.model_config
    assert spec == engine.runner.kv_spec
    assert (spec.num_layers, spec.num_kv_heads) == (cfg.num_layers, cfg.num_kv_heads)
    assert spec.head_dim == cfg.head_dim and spec.block_size == engine.config.block_size
    assert spec.kv_dtype == cfg.torch_dtype == "float32" and spec.tp_size == 1
    cache = engine.runner.kv_cache
    assert cache.shape == spec.cache_shape(engine.runner.num_blocks)
    assert cache.dtype == torch.float32
    assert engine.runner.num_blocks == budget // spec.bytes_per_block()
    assert cache.numel() * cache.element_size() == engine.runner.num_blocks * spec.bytes_per_block()


def test_kv_cache_dtype_is_not_the_model_dtype(checkpoint: Path) -> None:
    budget = 1 << 20
    base = _llm(checkpoint, kv_cache_bytes=budget)
    llm = _llm(checkpoint, kv_cache_bytes=budget, kv_cache_dtype="bfloat16")
    spec = llm.engine.kv_spec
    assert llm.engine.model_config.torch_dtype == "float32" and spec.kv_dtype == "bfloat16"
    assert llm.engine.runner.kv_cache.dtype == torch.bfloat16
    assert spec.bytes_per_block() * 2 == base.engine.kv_spec.bytes_per_block()
    assert llm.engine.runner.num_blocks == budget // spec.bytes_per_block()  # twice the blocks
    assert llm.engine.kv_manager.salt == f"{base.engine.kv_manager.salt}|kv=bfloat16"
    view = KVCacheView(llm.engine.runner.kv_cache, spec=spec)
    assert view.bytes_per_block() == spec.bytes_per_block()
    assert view_layout(view).dtype == "bfloat16"
    out = llm.generate([list(range(3, 40))], GREEDY)[0]
    assert len(out.token_ids) == GREEDY.max_tokens


@pytest.mark.parametrize("value", ["fp8_e4m3fn", "float8_e4m3fn", "int8", "torch.float16", ""])
def test_engine_config_rejects_other_kv_cache_dtypes(value: str) -> None:
    with pytest.raises(EngineConfigError, match="^kv_cache_dtype: "):
        EngineConfig(model="m", kv_cache_dtype=value)
    assert EngineConfig(model="m").resolved_kv_cache_dtype("bfloat16") == "bfloat16"
    half = EngineConfig(model="m", kv_cache_dtype="float16")
    assert half.resolved_kv_cache_dtype("bfloat16") == "float16"


def test_view_built_from_the_spec_round_trips_blocks() -> None:
    cache = allocate_kv_cache(SPEC, 10, torch.device("cpu"))
    view = KVCacheView(cache, spec=SPEC)
    assert view.spec is SPEC and view.tp == TPLayout(0, 1, 4)
    assert view.block_shape() == SPEC.block_shape()
    assert view.bytes_per_block() == SPEC.bytes_per_block()
    data = torch.randn(*SPEC.block_shape()[:2], 3, *SPEC.block_shape()[2:]).to(torch.float16)
    view.write_blocks([7, 2, 5], data)
    assert torch.equal(view.read_blocks([7, 2, 5]), data)
    rows = view.read_rows([7, 2])
    assert rows.shape == (2, SPEC.bytes_per_block())
    view.write_rows([1, 9], rows)
    assert torch.equal(view.read_blocks([1, 9]), data[:, :, :2])


def test_view_rejects_a_cache_other_than_its_spec() -> None:
    cache = allocate_kv_cache(SPEC, 4, torch.device("cpu"))
    others = [
        (KVCacheSpec(2, 4, 16, 8, "bfloat16"), "kv_dtype"),
        (KVCacheSpec(2, 4, 16, 16, "float16"), "block_size"),
        (KVCacheSpec(3, 4, 16, 8, "float16"), "num_layers"),
        (KVCacheSpec(2, 4, 16, 8, "float16", tp_size=2), "num_kv_heads"),  # 2 local heads, not 4
    ]
    for other, field in others:
        with pytest.raises(KVLayoutError) as info:
            KVCacheView(cache, spec=other)
        assert info.value.field == field
    with pytest.raises(KVLayoutError) as info:
        KVCacheView(cache.to(torch.float64))  # no spec: the tensor's dtype must be a KV dtype
    assert info.value.field == "kv_dtype"


def test_sharded_spec_gives_the_rank_and_group_views() -> None:
    sharded = KVCacheSpec(2, 4, 16, 8, "float16", tp_size=2)
    shard = allocate_kv_cache(sharded, 6, torch.device("cpu"))
    assert shard.shape[4] == 2
    view = KVCacheView(shard, spec=sharded)
    assert view.tp == TPLayout(0, 2, 4) and view.bytes_per_block() == sharded.bytes_per_block()
    layout = view_layout(view)
    assert layout == KVLayout.from_spec(sharded) == KVLayout(2, 4, 16, 2, 8, "float16")
    group = TPGroupKVView(shard, None, 2, 4, spec=sharded)  # type: ignore[arg-type]
    assert group.spec == sharded.with_tp(1) and group.bytes_per_block() == SPEC.bytes_per_block()
    assert view_layout(group) == KVLayout.from_spec(SPEC)


def test_handle_layout_from_spec_survives_the_wire() -> None:
    handle = KVHandle(
        transfer_id="t",
        source_worker_id="w",
        source_addresses=("a",),
        layout=KVLayout.from_spec(SPEC),
        block_ids=(3, 4),
        block_hashes=(),
        num_tokens=9,
        model_salt="m",
    )
    decoded = KVHandle.from_bytes(handle.to_bytes())
    assert decoded.layout == KVLayout.from_spec(SPEC)
    decoded.layout.check_compatible(KVLayout.from_spec(SPEC.with_tp(4)))  # tp_size may differ


def test_tier_slots_and_keys_come_from_the_spec() -> None:
    scaled = [
        KVCacheSpec(2, 4, 16, 8, "float8_e4m3fn", scales=(LayerScales(k, 1.0),) * 2)
        for k in (0.5, 2.0)
    ]
    views = [KVCacheView(allocate_kv_cache(s, 6, torch.device("cpu")), spec=s) for s in scaled]
    stores = [
        TieredStore(v, model_salt="m", cpu_bytes=8 * v.bytes_per_block(), pin_memory=False)
        for v in views
    ]
    try:
        assert stores[0].bytes_per_block == scaled[0].bytes_per_block()
        assert scaled[0].bytes_per_block() == SPEC.bytes_per_block() // 2  # fp8: one byte
        assert stores[0].key(b"h" * 16) != stores[1].key(b"h" * 16)  # other scales: a miss
    finally:
        for store in stores:
            store.close()


def test_backends_refuse_caches_they_cannot_serve() -> None:
    fp8 = KVCacheSpec(2, 4, 16, 8, "float8_e5m2", scales=(LayerScales(1.0, 1.0),) * 2)
    assert get_attention_backend(torch.device("cpu"), "torch", fp8, "bfloat16").kv_spec is fp8
    with pytest.raises(EngineConfigError, match="^kv_cache_dtype: .*per-layer scales"):
        AttentionBackend.check_kv_spec(RecordingBackend(), fp8, "bfloat16")  # the default
    backend = get_attention_backend(torch.device("cpu"), "torch", SPEC, "float32")  # casts: fine
    assert backend.kv_spec is SPEC
    from engine.attention.triton_backend import TritonAttentionBackend

    with pytest.raises(EngineConfigError, match="^kv_cache_dtype: the triton attention kernels"):
        TritonAttentionBackend(kv_spec=SPEC).check_kv_spec(SPEC, "bfloat16")
    TritonAttentionBackend(kv_spec=SPEC).check_kv_spec(SPEC, "float16")


class RecordingBackend(TorchAttentionBackend):
    """The torch backend, recording the step hooks and which metadata each layer saw."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, AttentionMetadata]] = []

    def plan(self, meta: AttentionMetadata) -> None:
        self.events.append(("plan", meta))

    def attend(self, query, k_cache, v_cache, meta, scale, layer=None):  # type: ignore[no-untyped-def]
        self.events.append(("attend", meta))
        return super().attend(query, k_cache, v_cache, meta, scale, layer)


def test_plan_runs_once_per_step_before_every_layer(checkpoint: Path) -> None:
    llm = _llm(checkpoint, num_kv_blocks=64, max_num_batched_tokens=64)
    backend = llm.engine.runner.backend = RecordingBackend()
    engine, num_layers = llm.engine, llm.engine.model_config.num_layers
    for i, prompt in enumerate(tiny_models.mixed_prompts(3)):
        engine.add_request(str(i), prompt, GREEDY)
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += engine.last_step_num_batched_tokens > 0
    plans = [meta for kind, meta in backend.events if kind == "plan"]
    assert steps > 3 and len(plans) == steps
    # Each plan, then that step's layers, all with the very same metadata object.
    expected = [(kind, id(m)) for m in plans for kind in ("plan", *["attend"] * num_layers)]
    assert [(kind, id(m)) for kind, m in backend.events] == expected
