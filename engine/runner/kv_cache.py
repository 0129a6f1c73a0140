"""The paged KV cache: its spec from the configs, sizing (measured free memory on GPU, a byte
budget on CPU) and allocation. Every byte count comes from the KVCacheSpec, never from the
model's dtype (the cache may be stored in another one).

FP8 caches (kv_cache_dtype "fp8" / "fp8_e4m3" / "fp8_e5m2") carry per-layer K and V scales in
the spec, fixed at start-up, first found wins: the checkpoint's `*.self_attn.k_scale` /
`v_scale` (or one `kv_scale` for both) scalars, as vLLM / Hugging Face FP8 checkpoints carry
them (`checkpoint_kv_scales`); else, with `calculate_kv_scales=True`, one calibration prefill of
a fixed text (`calibrate_kv_scales`: amax / the format's max rounded up to a power of two,
engine/attention/calibration.py); else 1.0 (`unit_scales`).

Hazards: the scales are part of the spec, hence of the block-hash salt and the transfer
handle: a prefill and a decode pool must end up with the same scales (same checkpoint, or both
calibrating the same model: power-of-two rounding absorbs small numeric differences). The
weight loader must skip a checkpoint's `*.k_scale` / `*.v_scale` tensors (engine/weights.py).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

import torch

from engine.attention.backend import AttentionMetadata
from engine.attention.calibration import KVAmaxRecorder, scales_from_amax
from engine.config import EngineConfig, ModelConfig
from engine.distributed.parallel_state import get_tp_group
from engine.errors import EngineConfigError
from engine.kv.spec import SCALED_KV_DTYPES, KVCacheSpec, LayerScales, unit_scales

_SLACK_BYTES = 512 * 2**20
# The calibration prefill's text (calculate_kv_scales): prose, a dialogue, code and numbers, so
# the recorded amax covers more than one kind of token.
CALIBRATION_TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable metal "
    "type made books cheap enough for ordinary readers. Within fifty years presses ran in more "
    "than two hundred cities across Europe.\n\n"
    "User: Can you explain how a hash table handles collisions?\n"
    "Assistant: Sure. Two keys can land in the same bucket; chaining keeps a small list per "
    "bucket, while open addressing probes the next free slot until it finds one.\n\n"
    "def fibonacci(n: int) -> int:\n    a, b = 0, 1\n    for _ in range(n):\n"
    "        a, b = b, a + b\n    return a\n\n"
    "Quarterly revenue rose 12.5% to $4,318 million; operating margin was 23.1%, up from "
    "19.7% a year earlier. Les marchés européens ont ouvert en hausse ce matin. "
    "日本の首都は東京です。 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987."
)


def kv_cache_spec(
    cfg: ModelConfig,
    engine: EngineConfig,
    tp_size: int,
    model: Any = None,
    model_path: str | None = None,
) -> KVCacheSpec:
    """The cache one rank of a `tp_size` group allocates for this model and engine. A scaled
    (FP8) cache takes its scales from the checkpoint at `model_path`, else from calibrating the
    loaded `model` (calculate_kv_scales; every TP rank must call this together), else 1.0."""
    kv_dtype = engine.resolved_kv_cache_dtype(cfg.torch_dtype)
    scales = None
    if kv_dtype in SCALED_KV_DTYPES:
        scales = _scales(cfg, engine, kv_dtype, model, model_path)
    return KVCacheSpec(
        num_layers=cfg.num_layers,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        block_size=engine.block_size,
        kv_dtype=kv_dtype,
        tp_size=tp_size,
        scales=scales,
    )


def _scales(
    cfg: ModelConfig, engine: EngineConfig, kv_dtype: str, model: Any, model_path: str | None
) -> tuple[LayerScales, ...]:
    found = None
    if model_path is not None and engine.load_format != "dummy":
        found = checkpoint_kv_scales(Path(model_path), cfg.num_layers)
    if found is None and engine.calculate_kv_scales:
        if model is None:
            raise EngineConfigError("calculate_kv_scales: needs the loaded model to calibrate")
        found = calibrate_kv_scales(model, cfg, engine, kv_dtype, model_path)
    return found if found is not None else unit_scales(cfg.num_layers)


_SCALE_NAME = re.compile(
    r"(?:^|\.)layers\.(\d+)\.self_attn\.(?:[kv]_proj\.)?(k_scale|v_scale|kv_scale)$"
)


def checkpoint_kv_scales(model_dir: Path, num_layers: int) -> tuple[LayerScales, ...] | None:
    """The per-layer KV scales a safetensors checkpoint carries (`model.layers.N.self_attn.
    k_scale` / `v_scale` scalars, or one `kv_scale` for both), None when it carries none.
    Raises EngineConfigError (naming kv_cache_dtype) when only some layers have them."""
    from safetensors import safe_open

    from engine.weights import safetensors_files

    found: dict[tuple[int, str], float] = {}
    if not model_dir.is_dir() or not any(model_dir.glob("*.safetensors")):
        return None  # not a safetensors checkpoint (e.g. a GGUF file): no scales to read
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                match = _SCALE_NAME.search(name)
                if match is not None:
                    value = float(f.get_tensor(name).float().reshape(-1)[0])
                    for kind in ("k_scale", "v_scale") if match[2] == "kv_scale" else (match[2],):
                        found[(int(match[1]), kind)] = value
    if not found:
        return None
    missing = [
        i for i in range(num_layers) if (i, "k_scale") not in found or (i, "v_scale") not in found
    ]
    if missing:
        raise EngineConfigError(
            f"kv_cache_dtype: the checkpoint has KV scales for some layers but not {missing[:8]}"
        )
    return tuple(
        LayerScales(found[(i, "k_scale")], found[(i, "v_scale")]) for i in range(num_layers)
    )


@torch.inference_mode()
def calibrate_kv_scales(
    model: Any,
    cfg: ModelConfig,
    engine: EngineConfig,
    kv_dtype: str,
    model_path: str | None = None,
) -> tuple[LayerScales, ...]:
    """One prefill of CALIBRATION_TEXT's token ids (the checkpoint's tokenizer; seeded random
    ids when there is none) into a throwaway cache in the model's dtype, recording each
    layer's max |K| and |V| (KVAmaxRecorder); the max over the TP ranks' heads."""
    from engine.models.llama import ForwardContext

    param = next(model.parameters())
    tokenizer_path = engine.tokenizer or model_path
    ids = _calibration_ids(tokenizer_path, engine.seed, cfg.vocab_size)
    ids = ids[: engine.max_num_batched_tokens]
    recorder = KVAmaxRecorder(cfg.num_layers)
    local_heads = model.model.layers[0].self_attn.num_kv_heads
    num_blocks = -(-len(ids) // engine.block_size) + 1  # block 0: the null block, unused
    cache = torch.zeros(
        (cfg.num_layers, 2, num_blocks, engine.block_size, local_heads, cfg.head_dim),
        dtype=param.dtype,
        device=param.device,
    )
    meta = single_prefill_metadata(len(ids), engine.block_size, param.device)
    input_ids = torch.tensor(ids, dtype=torch.int64, device=param.device)
    positions = torch.arange(len(ids), dtype=torch.int64, device=param.device)
    model(input_ids, positions, ForwardContext(recorder, meta, cache))
    tp = get_tp_group()
    k_amax = [_max_over_ranks(tp, x) for x in recorder.k_amax]
    v_amax = [_max_over_ranks(tp, x) for x in recorder.v_amax]
    return scales_from_amax(k_amax, v_amax, kv_dtype)


def _max_over_ranks(tp: Any, value: float) -> float:
    """max over the TP ranks of a float >= 0 (the group reduces ints: the bits of non-negative
    floats order as the floats do)."""
    bits = struct.unpack("<q", struct.pack("<d", value))[0]
    return float(struct.unpack("<d", struct.pack("<q", -tp.min_int(-bits)))[0])


def _calibration_ids(tokenizer_path: str | None, seed: int, vocab_size: int) -> list[int]:
    """CALIBRATION_TEXT's ids under the tokenizer at `tokenizer_path`; 512 seeded random ids
    when there is none (dummy models) or it does not fit the vocabulary."""
    if tokenizer_path is not None:
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
            ids = list(tokenizer(CALIBRATION_TEXT)["input_ids"])
            if ids and max(ids) < vocab_size:
                return ids
        except (OSError, ValueError):  # no tokenizer files there
            pass
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (512,), generator=gen).tolist()


def single_prefill_metadata(
    num_tokens: int, block_size: int, device: torch.device
) -> AttentionMetadata:
    """One request of `num_tokens` new tokens in blocks 1, 2, ... (no prefix)."""
    num_blocks = -(-num_tokens // block_size)
    table = torch.arange(1, num_blocks + 1, dtype=torch.int32, device=device)[None]
    return AttentionMetadata(
        slot_mapping=torch.arange(num_tokens, dtype=torch.int64, device=device) + block_size,
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=device),
        block_tables=table,
        max_query_len=num_tokens,
        max_seq_len=num_tokens,
        decode_only=num_tokens == 1,
        query_start_loc_cpu=(0, num_tokens),
        seq_lens_cpu=(num_tokens,),
    )


def kv_torch_dtype(spec: KVCacheSpec) -> torch.dtype:
    """The torch dtype the spec's cache is stored in."""
    dtype = getattr(torch, spec.kv_dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise EngineConfigError(f"kv_cache_dtype: this torch build has no {spec.kv_dtype!r}")
    return dtype


def activation_reserve(cfg: ModelConfig, engine: EngineConfig, dtype: torch.dtype) -> int:
    """Upper estimate of the forward pass's transient memory at the largest step (`dtype`: the
    model's, in which activations are computed)."""
    itemsize = torch.tensor([], dtype=dtype).element_size()
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    per_token = (8 * cfg.hidden_size + 3 * cfg.intermediate_size + 2 * qkv) * itemsize
    logits = engine.max_num_seqs * cfg.vocab_size * 4 * 4
    return engine.max_num_batched_tokens * per_token + logits + _SLACK_BYTES


def num_kv_blocks(
    cfg: ModelConfig,
    engine: EngineConfig,
    device: torch.device,
    spec: KVCacheSpec,
    model_dtype: torch.dtype,
) -> int:
    """Blocks (the reserved null block 0 included) of `spec.bytes_per_block()` in the budget."""
    if engine.num_kv_blocks is not None:
        return engine.num_kv_blocks
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = int(total * engine.gpu_memory_utilization) - (total - free)
        budget -= activation_reserve(cfg, engine, model_dtype)
    else:
        budget = engine.kv_cache_bytes
    bytes_per_block = spec.bytes_per_block()
    blocks = budget // bytes_per_block
    if blocks < 2:
        raise EngineConfigError(
            f"gpu_memory_utilization / kv_cache_bytes: no room for the KV cache "
            f"({budget / 2**20:.0f} MiB left, a block needs {bytes_per_block / 2**20:.2f} MiB)"
        )
    return int(blocks)


def allocate_kv_cache(spec: KVCacheSpec, num_blocks: int, device: torch.device) -> torch.Tensor:
    """A zeroed cache of `spec.cache_shape(num_blocks)` in the spec's dtype."""
    return torch.zeros(spec.cache_shape(num_blocks), dtype=kv_torch_dtype(spec), device=device)
