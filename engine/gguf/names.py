"""GGUF tensor names (llama.cpp's) to Hugging Face names, for the Llama family.

Pure: no torch, no file access. llama.cpp spells every Llama-family checkpoint the same way
(`blk.N.attn_q.weight`), whatever the architecture key says.
"""

from __future__ import annotations

import re

_GLOBAL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Tensors llama.cpp writes that hold no weight of the Hugging Face model. `rope_freqs` holds the
# Llama 3.1 rope frequency divisors: they become config.json's rope_scaling (engine.gguf.rope).
IGNORED_TENSORS = frozenset({"rope_freqs.weight"})

_LAYER_NAME = re.compile(r"blk\.(?P<layer>\d+)\.(?P<part>\w+)\.(?P<kind>weight|bias)")
_GLOBAL_NAME = re.compile(r"(?P<part>\w+)\.(?P<kind>weight|bias)")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of GGUF tensor `gguf_name`, or None for a name not in the family."""
    if m := _LAYER_NAME.fullmatch(gguf_name):
        part = _PER_LAYER.get(m["part"])
        return None if part is None else f"model.layers.{m['layer']}.{part}.{m['kind']}"
    if m := _GLOBAL_NAME.fullmatch(gguf_name):
        part = _GLOBAL.get(m["part"])
        return None if part is None else f"{part}.{m['kind']}"
    return None


def is_rotary_permuted(gguf_name: str) -> bool:
    """Whether llama.cpp permuted this tensor's rows for its rotary layout (Llama's q and k)."""
    m = _LAYER_NAME.fullmatch(gguf_name)
    return m is not None and m["part"] in ("attn_q", "attn_k")
