"""Frozen, validated configuration: the model's shape (from config.json) and the engine's knobs."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.distributed.parallel_state import AllReduceMode
from engine.errors import EngineConfigError, ModelLoadError, UnsupportedArchitectureError
from engine.quant.names import check_quantization, resolve_quantization
from engine.spec.config import SpeculativeConfig

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Phi3ForCausalLM",
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
)
# config.json without `architectures` names its class through `model_type`, as transformers reads it
_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
# The config.json fields naming an MoE's expert count (Mixtral's; Qwen's, which transformers 5
# writes as num_local_experts too)
_MOE_EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts")
# Rope types the cos | sin cache builds (engine/layers/rotary.py; keep the two in step)
_ROPE_TYPES = (None, "default", "llama3", "linear")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# vLLM's names: "fp8" = "fp8_e4m3" (float8_e4m3fn) and "fp8_e5m2", stored with per-layer scales
KV_CACHE_DTYPES = ("bfloat16", "float16", "float32", "fp8", "fp8_e4m3", "fp8_e5m2")
_KV_CACHE_DTYPE_ALIASES = {
    "fp8": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
}


@dataclass(frozen=True)
class MoEConfig:
    """The sparse MLP of a mixture-of-experts model, the same in every layer (engine.layers.moe).

    Routing: softmax over all `num_experts` router logits (float32), the `top_k` largest kept,
    renormalised to sum to 1 when `renormalize` (Mixtral always; Qwen's `norm_topk_prob`).
    `shared_expert_intermediate_size` > 0 adds Qwen2-MoE's always-on expert, scaled by a
    sigmoid gate. `intermediate_size` is one expert's FFN width."""

    num_experts: int
    top_k: int
    intermediate_size: int
    renormalize: bool
    shared_expert_intermediate_size: int = 0

    def __post_init__(self) -> None:
        checks = (
            (
                self.num_experts >= 1,
                "num_experts (num_local_experts)",
                f"{self.num_experts} (must be >= 1)",
            ),
            (
                1 <= self.top_k <= self.num_experts,
                "num_experts_per_tok",
                f"{self.top_k} (must be in [1, num_experts = {self.num_experts}])",
            ),
            (
                self.intermediate_size >= 1,
                "moe_intermediate_size (Mixtral: intermediate_size)",
                f"{self.intermediate_size} (must be >= 1)",
            ),
            (
                self.shared_expert_intermediate_size >= 0,
                "shared_expert_intermediate_size",
                f"{self.shared_expert_intermediate_size}",
            ),
        )
        for ok, name, detail in checks:
            if not ok:
                raise ModelLoadError(f"{name}: invalid value {detail}")


@dataclass(frozen=True)
class ModelConfig:
    """The shape and conventions of one decoder-only model (Llama family)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    sliding_window: int | None
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    torch_dtype: str
    # The linear layers' weight quantization (engine.quant): EngineConfig.quantization, or the
    # checkpoint's own (config.json quantization_config) when that is None
    quantization: str | None = None
    quantized_checkpoint: bool = False  # the checkpoint holds the quantized weights as they are
    moe: MoEConfig | None = None  # None: a dense MLP in every layer

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(self.architecture, list(SUPPORTED_ARCHITECTURES))
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads {self.num_heads} is not a multiple of "
                f"num_key_value_heads {self.num_kv_heads}"
            )
        if self.moe is not None and self.quantization is not None:
            raise ModelLoadError(
                f"quantization: {self.quantization!r} is not supported for mixture-of-experts "
                f"models ({self.architecture}: the experts would stay unquantized)"
            )

    @property
    def num_params(self) -> int:
        attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        if self.moe is not None:
            moe = self.moe
            inter = moe.num_experts * moe.intermediate_size + moe.shared_expert_intermediate_size
            mlp = 3 * self.hidden_size * inter + self.hidden_size * (moe.num_experts + 1)
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + 2 * self.hidden_size) + embed + self.hidden_size

    @staticmethod
    def from_dict(
        hf: dict[str, Any], dtype: str | None = None, quantization: str | None = None
    ) -> ModelConfig:
        model_type = hf.get("model_type", "unknown")
        archs = hf.get("architectures") or [_MODEL_TYPES.get(model_type, model_type)]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(arch, list(SUPPORTED_ARCHITECTURES))
        num_heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        rope = hf.get("rope_scaling") or hf.get("rope_parameters")
        _check_supported(hf, rope)
        rope_theta = hf.get("rope_theta") or (rope or {}).get("rope_theta") or 10000.0
        quant, on_disk = resolve_quantization(quantization, hf)
        if rope and (rope.get("rope_type") or rope.get("type")) in (None, "default"):
            rope = None
        window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
        return ModelConfig(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            intermediate_size=hf["intermediate_size"],
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=dict(rope) if rope else None,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Phi-3's qkv_proj never has a bias, whatever its config says (as in transformers)
            attention_bias=_attention_bias(arch, hf),
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            sliding_window=window,
            eos_token_ids=eos_ids,
            bos_token_id=hf.get("bos_token_id"),
            torch_dtype=dtype or _dtype_name(hf.get("torch_dtype") or hf.get("dtype")),
            quantization=quant,
            quantized_checkpoint=on_disk,
            moe=_moe_config(arch, hf),
        )

    @staticmethod
    def from_path(
        path: str | os.PathLike, dtype: str | None = None, quantization: str | None = None
    ) -> ModelConfig:
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise ModelLoadError(
                f"missing model file: {config_file} (is {path!s} a checkpoint directory?)"
            )
        return ModelConfig.from_dict(json.loads(config_file.read_text()), dtype, quantization)


def _check_supported(hf: dict[str, Any], rope: dict[str, Any] | None) -> None:
    """Reject, naming the field, configs the decoder would compute differently from
    transformers: a clear error at load rather than fluent wrong text."""
    rope = rope or {}
    for field_name, params in (("", hf), ("rope_scaling.", rope)):
        factor = params.get("partial_rotary_factor")
        if factor is not None and factor != 1.0:
            raise ModelLoadError(
                f"{field_name}partial_rotary_factor: {factor} is not supported (rope rotates the "
                "whole head)"
            )
    kind = rope.get("rope_type") or rope.get("type")
    if kind not in _ROPE_TYPES:
        # LongRoPE ("longrope", Phi-3's "su"): transformers switches every position's
        # frequencies once a sequence passes original_max_position_embeddings and recomputes
        # its keys; a paged cache of rotated keys cannot follow that switch
        raise ModelLoadError(
            f"rope_scaling: type {kind!r} is not supported (supported: default, llama3, linear)"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"hidden_act: {hf['hidden_act']!r} is not supported (only 'silu')")


def _attention_bias(arch: str, hf: dict[str, Any]) -> bool:
    """Whether q/k/v carry a bias. Phi-3's never does, whatever its config says (as in
    transformers); Qwen2-MoE names the flag `qkv_bias` (default on, as Qwen2's)."""
    if arch == "Qwen2MoeForCausalLM":
        return bool(hf.get("qkv_bias", True))
    return bool(hf.get("attention_bias", arch == "Qwen2ForCausalLM")) and arch != "Phi3ForCausalLM"


def _moe_config(arch: str, hf: dict[str, Any]) -> MoEConfig | None:
    """The sparse MLP of a mixture-of-experts architecture (None for a dense one). Only the
    default layout is supported, every layer sparse: a Qwen config with dense layers
    (`decoder_sparse_step` > 1 or a non-empty `mlp_only_layers`) is refused, naming the field."""
    if arch not in ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        return None
    num_experts = next((hf[k] for k in _MOE_EXPERT_COUNT_FIELDS if k in hf), None)
    if not isinstance(num_experts, int) or "num_experts_per_tok" not in hf:
        raise ModelLoadError(
            f"num_experts: {arch} config.json needs an integer num_local_experts or num_experts "
            "and num_experts_per_tok"
        )
    if arch == "MixtralForCausalLM":
        return MoEConfig(num_experts, hf["num_experts_per_tok"], hf["intermediate_size"], True)
    step = hf.get("decoder_sparse_step", 1)
    if step != 1:
        raise ModelLoadError(
            f"decoder_sparse_step: {step!r} is not supported (only 1: every layer sparse)"
        )
    if hf.get("mlp_only_layers"):
        raise ModelLoadError(
            f"mlp_only_layers: {hf['mlp_only_layers']!r} is not supported (only []: every layer "
            "sparse)"
        )
    shared = hf.get("shared_expert_intermediate_size", 0) if arch == "Qwen2MoeForCausalLM" else 0
    return MoEConfig(
        num_experts=num_experts,
        top_k=hf["num_experts_per_tok"],
        intermediate_size=hf.get("moe_intermediate_size", hf["intermediate_size"]),
        renormalize=bool(hf.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=shared or 0,
    )


def _dtype_name(value: str | None) -> str:
    if value in _DTYPES:
        return str(value)
    return "bfloat16" if value is None else "float32"


def resolve_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise EngineConfigError(f"dtype: {name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclass(frozen=True)
class EngineConfig:
    """Everything one engine instance needs; built once, never mutated."""

    model: str
    tokenizer: str | None = None
    dtype: str = "auto"  # "auto" = float32 on CPU, the checkpoint's dtype (or bf16) on GPU
    # The KV cache's element type: "auto" = the model's dtype, or one of KV_CACHE_DTYPES. The
    # cache's bytes come from the runner's KVCacheSpec (engine/kv/spec.py), never from `dtype`.
    kv_cache_dtype: str = "auto"
    # Weight quantization of the linear layers (vLLM's name): None, "fp8" (W8A8, e4m3 weights
    # with per-channel scales) or "int4" (W4A16, groups of 128); engine.quant
    quantization: str | None = None
    # FP8 caches only: compute the per-layer K/V scales (amax / the format's max, rounded up
    # to a power of two) from a calibration prefill at start-up (engine/attention/
    # calibration.py) instead of 1.0, unless the checkpoint carries `*.k_scale` / `*.v_scale`
    # tensors (those win).
    calculate_kv_scales: bool = False
    device: str = "auto"  # "auto" = cuda when available, else cpu
    load_format: str = "auto"  # "auto" (safetensors) or "dummy" (random weights of the right shape)
    seed: int = 0
    block_size: int = 16
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    gpu_memory_utilization: float = 0.90
    kv_cache_bytes: int = 256 * 2**20  # the KV budget on CPU
    num_kv_blocks: int | None = None  # overrides the sizing (tests use tiny pools)
    tensor_parallel_size: int = 1
    # How TP ranks sum partial results: "auto" ("fused" on CUDA when every rank can map its
    # peers, else "symm_mem" when that works, else NCCL), "nccl", "symm_mem" (a one-shot
    # symmetric-memory kernel for small messages), "fused" (symm_mem, and for steps of <= 128
    # tokens the row-parallel all-reduce fused with the residual add and RMSNorm in one kernel;
    # engine.distributed.fused_norm), or
    # "skip" (measurement only: no collective at all, outputs are wrong; bench/tp.py uses it to
    # time a step without its all-reduces). A string naming a mode is converted to the enum.
    tp_all_reduce: AllReduceMode = AllReduceMode.AUTO
    # Row-parallel layers of steps with at most this many tokens emit their partial sums in
    # float32 and all-reduce them in float32, rounding to the model dtype once, after the sum,
    # as TP = 1 does. On CPU that makes bf16 TP = N equal TP = 1; on CUDA the column-parallel
    # GEMMs already round differently (cuBLAS picks other kernels for the narrower shards), so
    # it bought no greedy agreement on 2 x H200 and cost 6% of batch-64 throughput (the
    # all-reduce moves twice the bytes): off by default (docs/BENCHMARKS.md).
    tp_fp32_reduce_max_tokens: int = 0
    attention_backend: str | None = None  # None picks Triton on CUDA, torch on CPU
    enforce_eager: bool = False  # no CUDA graphs
    cuda_graph_batch_sizes: tuple[int, ...] = field(
        default=(1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
    )
    model_salt: str | None = None  # defaults to the model path / name
    # Speculative decoding (engine.spec.config.SpeculativeConfig, or its dict / JSON text as
    # vLLM takes it: {"method": "ngram", "num_speculative_tokens": 4}); None: off.
    speculative_config: SpeculativeConfig | Mapping[str, Any] | str | None = None
    # Overlap scheduling (vLLM's async scheduling): schedule and launch step N+1 while step N
    # runs, feeding N's tokens from device memory. None: on for CUDA at TP = 1 without
    # speculation; steps with a row that cannot overlap (engine.engine.LLMEngine) run in step.
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        checks = {
            "block_size": self.block_size in (8, 16, 32, 64, 128),
            "max_num_seqs": self.max_num_seqs >= 1,
            "max_num_batched_tokens": self.max_num_batched_tokens >= 1,
            "gpu_memory_utilization": 0.0 < self.gpu_memory_utilization <= 1.0,
            "kv_cache_bytes": self.kv_cache_bytes > 0,
            "tensor_parallel_size": self.tensor_parallel_size >= 1,
            "tp_fp32_reduce_max_tokens": self.tp_fp32_reduce_max_tokens >= 0,
            "load_format": self.load_format in ("auto", "safetensors", "dummy"),
            "num_kv_blocks": self.num_kv_blocks is None or self.num_kv_blocks >= 2,
            "max_model_len": self.max_model_len is None or self.max_model_len >= 2,
        }
        for name, ok in checks.items():
            if not ok:
                raise EngineConfigError(f"{name}: invalid value {getattr(self, name)!r}")
        try:
            object.__setattr__(self, "tp_all_reduce", AllReduceMode.parse(self.tp_all_reduce))
        except ValueError as err:
            raise EngineConfigError(f"tp_all_reduce: {err}") from None
        spec = SpeculativeConfig.parse(self.speculative_config)
        object.__setattr__(self, "speculative_config", spec)
        if spec is not None and self.max_model_len is not None:
            spec.check_model_len(self.max_model_len)
        if self.dtype != "auto":
            resolve_dtype(self.dtype)
        check_quantization(self.quantization)
        if self.kv_cache_dtype not in ("auto", *KV_CACHE_DTYPES):
            raise EngineConfigError(
                f"kv_cache_dtype: {self.kv_cache_dtype!r} is not 'auto' or one of {KV_CACHE_DTYPES}"
            )
        if self.calculate_kv_scales and self.kv_cache_dtype not in _KV_CACHE_DTYPE_ALIASES:
            raise EngineConfigError(
                f"calculate_kv_scales: needs an fp8 kv_cache_dtype, got {self.kv_cache_dtype!r}"
            )
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise EngineConfigError(f"device: {self.device!r} is not 'auto', 'cpu' or 'cuda[:N]'")

    @property
    def speculation(self) -> SpeculativeConfig | None:
        """`speculative_config` as parsed at construction."""
        spec = self.speculative_config
        assert spec is None or isinstance(spec, SpeculativeConfig)
        return spec

    def resolved_kv_cache_dtype(self, model_dtype: str) -> str:
        """The KV cache's dtype name for a model computing in `model_dtype` ("auto": that one)."""
        if self.kv_cache_dtype == "auto":
            return model_dtype
        return _KV_CACHE_DTYPE_ALIASES.get(self.kv_cache_dtype, self.kv_cache_dtype)

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)
