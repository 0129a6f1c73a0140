"""Small GGUF files written the way llama.cpp's converter writes them, from tiny random
transformers models: llama.cpp's tensor names, its rotary permutation of Llama's q/k rows,
norms and biases in F32, every matrix in the chosen type (quantized by gguf.quants)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

VOCAB = 512  # the tiny-random tokenizer's size, so the llama file can carry that tokenizer
SHAPE: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.1,
    "bos_token_id": 0,
    "eos_token_id": 1,
}
_HF_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


LLAMA31_ROPE: dict[str, Any] = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def tiny_model(arch: str) -> torch.nn.Module:
    """A random float32 transformers model: "llama", "llama31" (Llama 3.1 rope scaling), "qwen2"
    (tied, q/k/v biases) or "qwen3" (q/k norms, head_dim 32 != hidden / heads)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    config = {
        "llama": lambda: LlamaConfig(**SHAPE, rope_theta=10000.0, tie_word_embeddings=False),
        "llama31": lambda: LlamaConfig(**SHAPE, rope_theta=500000.0, rope_scaling=LLAMA31_ROPE),
        "qwen2": lambda: Qwen2Config(**SHAPE, tie_word_embeddings=True, use_sliding_window=False),
        "qwen3": lambda: Qwen3Config(
            **SHAPE, head_dim=32, tie_word_embeddings=False, use_sliding_window=False
        ),
    }[arch]()
    torch.manual_seed(4321)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # non-trivial norms and biases, so a misplaced one shows
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", ".bias")):
                param.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.1)
    return model


def gguf_name(hf_name: str) -> str:
    if hf_name.startswith("model.layers."):
        _, _, layer, rest = hf_name.split(".", 3)
        part, kind = rest.rsplit(".", 1)
        return f"blk.{layer}.{_HF_TO_GGUF[part]}.{kind}"
    return {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }[hf_name]


def llamacpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter's `permute` for Llama's q and k rows."""
    return (
        w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def metadata(arch: str, config: Any) -> dict[str, Any]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    keys = {
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "block_count": config.num_hidden_layers,
        "feed_forward_length": config.intermediate_size,
        "attention.head_count": config.num_attention_heads,
        "attention.head_count_kv": config.num_key_value_heads,
        "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "rope.freq_base": float(config.rope_parameters["rope_theta"]),
        "vocab_size": config.vocab_size,
        "rope.dimension_count": head_dim,
    }
    if arch == "qwen3":
        keys["attention.key_length"] = head_dim
    meta = {f"{arch}.{k}": v for k, v in keys.items()}
    meta |= {
        "tokenizer.ggml.bos_token_id": config.bos_token_id,
        "tokenizer.ggml.eos_token_id": config.eos_token_id,
    }
    return meta


def gguf_tensors(
    model: torch.nn.Module, arch: str, qtype: GGMLQuantizationType
) -> dict[str, tuple[np.ndarray, Any]]:
    """`{gguf name: (array, raw ggml type or None)}` as llama.cpp would write them."""
    cfg = model.config
    tied = cfg.tie_word_embeddings
    out = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        w = tensor.float().numpy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
            w = llamacpp_permute(w, heads)
        out[gguf_name(name)] = _encode(w, qtype)
    return out


def llamacpp_rope_freqs(head_dim: int, theta: float, rope: dict[str, Any]) -> np.ndarray:
    """The `rope_freqs.weight` llama.cpp's converter writes for Llama 3.1 rope scaling: each
    frequency's divisor."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    divisors = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            divisors.append(1.0)
        elif wavelen > old_len / low:
            divisors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, dtype=np.float32)


def _encode(w: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, Any]:
    if w.ndim == 1 or qtype == GGMLQuantizationType.F32:
        return np.ascontiguousarray(w, dtype=np.float32), None
    if qtype == GGMLQuantizationType.F16:
        return w.astype(np.float16), None
    return quantize(w, qtype), qtype


def tokenizer_metadata(tokenizer_dir: Path) -> dict[str, Any]:
    """A byte-level BPE tokenizer (tokenizer.json) and its chat template as llama.cpp writes them."""
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"] | {t["content"]: t["id"] for t in spec["added_tokens"]}
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["content"] for t in spec["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    template = config.get("chat_template") or (tokenizer_dir / "chat_template.jinja").read_text()
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in special else 1 for t in tokens],
        "tokenizer.ggml.merges": merges,
        "tokenizer.chat_template": template,
    }


def write_gguf(
    path: Path,
    arch: str,
    meta: dict[str, Any],
    tensors: dict[str, tuple[np.ndarray, Any]],
) -> Path:
    writer = GGUFWriter(str(path), arch)
    for key, value in meta.items():
        _add(writer, key, value)
    for name, (array, raw_type) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add(writer: GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_uint32(key, int(value))


def model_gguf(path: Path, arch: str, qtype: GGMLQuantizationType, **meta_overrides: Any) -> Path:
    """`tiny_model(arch)` written to `path` in `qtype`, metadata overridden by `meta_overrides`."""
    model = tiny_model(arch)
    meta = metadata(arch, model.config) | meta_overrides
    return write_gguf(path, arch, meta, gguf_tensors(model, arch, qtype))


def hf_from_gguf(path: Path) -> torch.nn.Module:
    """transformers' own reading of the file (float32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


def hf_greedy(model: torch.nn.Module, prompts: list[list[int]], num_new: int) -> list[list[int]]:
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        gen = model.generate(  # type: ignore[operator]
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=num_new,
            min_new_tokens=num_new,
            do_sample=False,
            pad_token_id=0,
        )
        outs.append(gen[0, len(p) :].tolist())
    return outs
