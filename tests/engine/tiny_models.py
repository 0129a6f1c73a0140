"""Tiny random Hugging Face checkpoints of every supported architecture, built with transformers."""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(
    vocab_size=500,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
)


def _configs() -> dict:
    from transformers import (
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    return {
        "llama31": LlamaConfig(
            **COMMON,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=128,
            ),
        ),
        "mistral": MistralConfig(**{**COMMON, "num_key_value_heads": 1}, sliding_window=None),
        "qwen2": Qwen2Config(**COMMON, tie_word_embeddings=True, use_sliding_window=False),
        "qwen3": Qwen3Config(
            **COMMON, head_dim=32, tie_word_embeddings=False, use_sliding_window=False
        ),
        # Fused qkv_proj / gate_up_proj tensors; a sliding window the engine caps max_model_len
        # at (prompts stay inside it); dropout the inference path ignores
        "phi3": Phi3Config(**COMMON, sliding_window=512, resid_pdrop=0.1, pad_token_id=None),
    }


ARCHS = ("llama31", "mistral", "qwen2", "qwen3", "phi3")
# Mixture-of-experts checkpoints (tests/engine/test_moe.py): 8 experts, top-2, every layer sparse
MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe")
_MOE_COMMON = dict(num_experts_per_tok=2, sliding_window=None, use_sliding_window=False)


def _moe_configs() -> dict:
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    qwen = dict(**COMMON, **_MOE_COMMON, num_experts=8, moe_intermediate_size=32)
    return {
        "mixtral": MixtralConfig(
            **{**COMMON, "intermediate_size": 32}, **_MOE_COMMON, num_local_experts=8
        ),
        # qkv bias and a gated shared expert; top-k weights not renormalised
        "qwen2_moe": Qwen2MoeConfig(**qwen, shared_expert_intermediate_size=48),
        "qwen3_moe": Qwen3MoeConfig(**qwen, head_dim=32, norm_topk_prob=True),
    }


def build(name: str, root: Path) -> Path:
    from transformers import AutoModelForCausalLM

    path = root / name
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(1234)
    config = _moe_configs()[name] if name in MOE_ARCHS else _configs()[name]
    model = AutoModelForCausalLM.from_config(config).float().eval()
    if name in MOE_ARCHS:  # distinct router scores: no top-k ties between implementations
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.gate.weight.normal_(0, 0.5)
    if name in ("qwen2", "qwen2_moe"):  # exercise the qkv bias with non-zero values
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                ):
                    proj.bias.normal_(0, 0.1)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def hf_greedy(path: Path, prompts: list[list[int]], num_new: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, exactly `num_new` tokens."""
    model = hf_model(path)
    outs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=num_new,
            min_new_tokens=num_new,
            do_sample=False,
            pad_token_id=0,
        )
        outs.append(gen[0, len(prompt) :].tolist())
    return outs


def engine_greedy(path: Path, prompts: list[list[int]], num_new: int, **kwargs) -> list[list[int]]:
    """The engine's (CPU) greedy continuation of each prompt, exactly `num_new` tokens; the
    block pool is checked whole and free afterwards."""
    from engine import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=num_new, min_tokens=num_new)
    llm = LLM(str(path), device="cpu", show_progress=False, **kwargs)
    outs = llm.generate(prompts, params)
    llm.engine.scheduler.kv.pool.check_integrity()
    assert llm.engine.stats().num_free_blocks == llm.engine.stats().num_usable_blocks
    return [o.token_ids for o in outs]


def mixed_prompts(n: int = 8, seed: int = 0, vocab: int = 500) -> list[list[int]]:
    """Prompts of 3 to 300 tokens, avoiding the special ids 0-2."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [3, 300, 17, 64, 5, 129, 33, 250][:n]
    return [torch.randint(3, vocab, (n_tok,), generator=gen).tolist() for n_tok in lengths]
