"""Tensor parallelism on CPU with gloo and real Ray actors: TP = 2 equals TP = 1 token for token,
and each rank loads only its slices of the checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import EngineConfig, ModelConfig
from engine.distributed import TPGroup, set_tp_group
from engine.engine import LLMEngine
from engine.models.registry import model_class
from engine.weights import load_safetensors
from tests.distributed.tp_fixtures import ALL_MODELS, ODD_VOCAB, prompts

NUM_NEW = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW, min_tokens=NUM_NEW)


def _generate(path: Path, tp: int, mode: str | None = None, **kwargs) -> list[list[int]]:
    llm = LLM(str(path), device="cpu", show_progress=False, tensor_parallel_size=tp, **kwargs)
    assert mode is None or llm.engine.runner.all_reduce_mode == mode
    try:
        outs = llm.generate(prompts(), GREEDY)
        stats = llm.engine.stats()
        assert stats.num_free_blocks == stats.num_usable_blocks
        if tp > 1:
            assert llm.engine.tp is not None and llm.engine.tp.num_steps > NUM_NEW
        return [o.token_ids for o in outs]
    finally:
        llm.shutdown()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_tp2_equals_tp1(name, checkpoints, local_ray):
    """Every architecture (mistral and the odd-vocab model have 1 KV head: replicated at TP 2)."""
    reference = _generate(checkpoints[name], 1)
    assert all(len(r) == NUM_NEW for r in reference)
    assert _generate(checkpoints[name], 2, max_num_batched_tokens=64) == reference


@pytest.mark.parametrize("name", ["llama31", "qwen2", "phi3"])
def test_tp2_fused_norm_equals_tp1(name, checkpoints, local_ray):
    """tp_all_reduce="fused": the TP pass hands row-parallel outputs unreduced to the norms that
    sum them (engine.distributed.tp_pass; the reference composition on CPU, the CUDA kernel in
    the multi-GPU test below)."""
    reference = _generate(checkpoints[name], 1)
    tp2 = _generate(
        checkpoints[name], 2, "fused-reference", max_num_batched_tokens=64, tp_all_reduce="fused"
    )
    assert tp2 == reference


def test_engine_api_and_restart(checkpoints, local_ray):
    """LLMEngine(EngineConfig(..., tensor_parallel_size=2)) steps directly; after shutdown a
    TP = 1 engine in the same process is unaffected, and a second TP = 2 group starts."""
    path = str(checkpoints["qwen3"])
    engine = LLMEngine(
        EngineConfig(model=path, device="cpu", tensor_parallel_size=2, num_kv_blocks=40),
        show_progress=False,
    )
    assert engine.runner.num_blocks == 40
    assert (
        engine.runner.model.model.layers[0].self_attn.num_heads == 2
    )  # 4 query heads over 2 ranks
    engine.add_request("a", prompts()[1], GREEDY)
    finished = []
    while engine.has_unfinished():
        finished += [o for o in engine.step() if o.finished]
    from engine.executor import shm_channel

    assert engine.tp is not None and engine.tp._channel is not None
    assert engine.tp._channel.transport == ("shm" if shm_channel.supported() else "gloo")
    assert engine.tp._channel.num_diff_steps > 0  # decode steps went as diffs of the previous one
    engine.shutdown()
    engine.shutdown()  # idempotent
    assert finished[0].token_ids == _generate(Path(path), 1)[1]


class _SpySlice:
    """A safetensors slice that records how many elements each read returned."""

    def __init__(self, inner, log: list[tuple[str, int, int]], name: str) -> None:
        self.inner, self.log, self.name = inner, log, name

    def get_shape(self) -> list[int]:
        return self.inner.get_shape()

    def __getitem__(self, index):
        out = self.inner[index]
        full = 1
        for d in self.inner.get_shape():
            full *= d
        self.log.append((self.name, out.numel(), full))
        return out


def _load_rank(
    path: Path, rank: int, monkeypatch
) -> tuple[torch.nn.Module, list[tuple[str, int, int]]]:
    import engine.weights as weights

    log: list[tuple[str, int, int]] = []
    real = weights._iter_slices
    monkeypatch.setattr(
        weights,
        "_iter_slices",
        lambda files, show: ((n, _SpySlice(s, log, n)) for n, s in real(files, show)),
    )
    cfg = ModelConfig.from_path(path, "float32")
    set_tp_group(TPGroup(rank=rank, size=2))  # loading runs no collective
    try:
        model = model_class(cfg)(cfg, 64)
        load_safetensors(model, path, show_progress=False)
    finally:
        set_tp_group(TPGroup())
    return model, log


@pytest.mark.parametrize("name", ["mistral", ODD_VOCAB, "qwen2"])
def test_rank_loads_only_its_slices(name, checkpoints, monkeypatch):
    from safetensors.torch import load_file

    path = checkpoints[name]
    full = load_file(str(path / "model.safetensors"))
    cfg = ModelConfig.from_path(path, "float32")
    hd, kv = cfg.head_dim, cfg.num_kv_heads
    for rank in (0, 1):
        model, log = _load_rank(path, rank, monkeypatch)
        p = dict(model.named_parameters())
        attn = "model.layers.1.self_attn."
        q_rows = cfg.num_heads * hd // 2
        kv_head = rank * kv // 2  # replicated when TP exceeds the KV heads
        kv_rows = max(1, kv // 2) * hd
        expect_qkv = torch.cat(
            [
                full[attn + "q_proj.weight"][rank * q_rows : (rank + 1) * q_rows],
                full[attn + "k_proj.weight"][kv_head * hd : kv_head * hd + kv_rows],
                full[attn + "v_proj.weight"][kv_head * hd : kv_head * hd + kv_rows],
            ]
        )
        torch.testing.assert_close(p[attn + "qkv_proj.weight"], expect_qkv, rtol=0, atol=0)
        cols = cfg.num_heads * hd // 2
        torch.testing.assert_close(
            p[attn + "o_proj.weight"],
            full[attn + "o_proj.weight"][:, rank * cols : (rank + 1) * cols],
            rtol=0,
            atol=0,
        )
        inter = cfg.intermediate_size // 2
        gate_up = torch.cat(
            [
                full["model.layers.1.mlp.gate_proj.weight"][rank * inter : (rank + 1) * inter],
                full["model.layers.1.mlp.up_proj.weight"][rank * inter : (rank + 1) * inter],
            ]
        )
        torch.testing.assert_close(
            p["model.layers.1.mlp.gate_up_proj.weight"], gate_up, rtol=0, atol=0
        )
        _check_vocab_shard(p["model.embed_tokens.weight"], full["model.embed_tokens.weight"], rank)
        replicated = ("norm", "bias") + (("k_proj", "v_proj") if kv < 2 else ())
        sharded = [(n, got, total) for n, got, total in log if not any(r in n for r in replicated)]
        vocab = (
            "embed_tokens",
            "lm_head",
        )  # padded vocabulary: rank 0 holds slightly more than half
        assert sharded and all(
            got <= total // 2 or (any(v in n for v in vocab) and got < total)
            for n, got, total in sharded
        ), "a rank read a whole tensor"
        assert sum(got for _, got, _ in log) < 0.75 * sum(t.numel() for t in full.values())


def _check_vocab_shard(local: torch.Tensor, full: torch.Tensor, rank: int) -> None:
    per_rank = local.shape[0]
    assert per_rank * 2 >= full.shape[0] and per_rank % 64 == 0
    rows = full[rank * per_rank : (rank + 1) * per_rank]
    torch.testing.assert_close(local[: rows.shape[0]], rows, rtol=0, atol=0)
    assert torch.count_nonzero(local[rows.shape[0] :]) == 0  # padded rows stay zero


@pytest.mark.multi_gpu
@pytest.mark.parametrize(
    "name,all_reduce", [("llama31", "fused"), ("llama31", "auto"), ("mistral", "auto")]
)
def test_tp2_equals_tp1_nccl(name, all_reduce, checkpoints, local_ray):
    """On two GPUs (CUDA graphs, float32): the same equality, with the fused all-reduce + norm
    kernel (first: symmetric memory serves only a process's first TP group) and then with the
    all-reduces "auto" picks (NCCL for the restarted groups)."""

    def run(tp: int) -> list[list[int]]:
        llm = LLM(
            str(checkpoints[name]),
            dtype="float32",
            show_progress=False,
            tensor_parallel_size=tp,
            gpu_memory_utilization=0.3,
            tp_all_reduce=all_reduce,
        )
        try:
            return [o.token_ids for o in llm.generate(prompts(), GREEDY)]
        finally:
            llm.shutdown()

    assert run(2) == run(1)


def test_tp2_equals_tp1_bf16(checkpoints, local_ray):
    """In bfloat16 too: row-parallel partial sums are reduced in float32 and rounded once, as
    TP = 1 rounds its single matmul (EngineConfig.tp_fp32_reduce_max_tokens)."""
    reference = _generate(checkpoints["llama31"], 1, dtype="bfloat16")
    tp2 = _generate(
        checkpoints["llama31"],
        2,
        dtype="bfloat16",
        max_num_batched_tokens=64,
        tp_fp32_reduce_max_tokens=1024,
    )
    assert tp2 == reference
