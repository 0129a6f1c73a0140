"""The Hugging Face config.json a GGUF file's metadata describes (Llama family).

Follows transformers' GGUF config mapping, so a converted checkpoint equals what transformers
loads from the same file, except where the file states something transformers drops:
- `attention.key_length` gives the head size when present (Qwen3 files state it; transformers
  falls back to its class default);
- `attention_bias` is whether the q bias tensor is present;
- the end-of-turn tokens llama.cpp stops on (`eot`, `eom`) join the end-of-sequence ids;
- Llama 3.1's rope scaling, which llama.cpp writes as a `rope_freqs` tensor (`engine.gguf.rope`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import ModelLoadError
from engine.gguf.rope import llama3_scaling

# general.architecture -> Hugging Face class. llama.cpp writes Mistral (7B) files as "llama".
_HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
SUPPORTED_GGUF_ARCHITECTURES = tuple(_HF_ARCHITECTURES)


def hf_config(
    path: Path,
    metadata: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    num_tokens: int | None,
    torch_dtype: str,
    rope_divisors: np.ndarray | None = None,
) -> dict[str, Any]:
    """config.json for `path`, from its scalar `metadata`, its tensor `shapes` (GGUF names, torch
    order), its vocabulary length, the dtype to run in by default and its `rope_freqs` tensor if
    it has one. Raises ModelLoadError for a missing key or an unsupported rope scaling."""
    arch = str(metadata["general.architecture"])

    def key(name: str, default: Any = ...) -> Any:
        value = metadata.get(f"{arch}.{name}", default)
        if value is ...:
            raise ModelLoadError(f"{path}: metadata key {arch}.{name} is missing")
        return value

    num_heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    head_dim = _head_dim(arch, key) or hidden // num_heads
    theta = float(key("rope.freq_base", 10000.0))
    return {
        "architectures": [_HF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": int(key("vocab_size", num_tokens or _rows(shapes, "token_embd.weight"))),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(key("attention.head_count_kv", num_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(path, key, rope_divisors, head_dim, theta),
        "max_position_embeddings": int(key("context_length")),
        "tie_word_embeddings": "output.weight" not in shapes,
        "attention_bias": "blk.0.attn_q.bias" in shapes,
        "use_sliding_window": False,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": _eos_ids(metadata),
        "torch_dtype": torch_dtype,
    }


def _head_dim(arch: str, key: Any) -> int | None:
    """The stated head size; else, for Llama only (as transformers reads it), its rotary size."""
    size = key("attention.key_length", None)
    if size is None and arch == "llama":
        size = key("rope.dimension_count", None)
    return None if size is None else int(size)


def _rope_scaling(
    path: Path, key: Any, divisors: np.ndarray | None, head_dim: int, theta: float
) -> dict[str, Any] | None:
    kind = key("rope.scaling.type", None)
    if kind in (None, "none") and divisors is not None:
        try:
            return llama3_scaling(divisors, head_dim, theta)
        except ValueError as exc:
            raise ModelLoadError(f"{path}: {exc}") from exc
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    raise ModelLoadError(f"{path}: rope scaling {kind!r} is not supported (supported: linear)")


def _eos_ids(metadata: Mapping[str, Any]) -> int | list[int] | None:
    keys = (f"tokenizer.ggml.{k}_token_id" for k in ("eos", "eot", "eom"))
    ids = list(dict.fromkeys(int(metadata[k]) for k in keys if metadata.get(k) is not None))
    return None if not ids else ids[0] if len(ids) == 1 else ids


def _rows(shapes: Mapping[str, tuple[int, ...]], name: str) -> int:
    return (shapes.get(name) or (0,))[0]
