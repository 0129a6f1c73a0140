"""KVCacheSpec: one frozen description of the paged KV cache, built once per engine.

The cache of one rank is `[num_layers, 2, num_blocks, block_size, num_local_heads, head_dim]`
of `kv_dtype` (engine/attention/backend.py). The spec is built by the runner from the model's
config, the engine's config and the TP size (engine/runner/kv_cache.py `kv_cache_spec`), and
everything else derives from it instead of guessing from the model's dtype: the runner's sizing
and allocation, the attention backend's check that it can serve the cache, KVCacheView's check
of its tensor, the transfer handle's `KVLayout`, the tier store's slot size and keys, and the
router's transfer cost (`bytes_per_token`).

Pure: no torch import (the router prices transfers with it and must never import torch). Dtypes
are names, torch's without the "torch." prefix; torch code maps them with `getattr(torch, name)`.

Quantized caches (FP8) are a small addition by design: `kv_dtype` is distinct from the model's
dtype, and the dtypes in SCALED_KV_DTYPES require `scales`, one (k_scale, v_scale) per layer,
that dequantize stored values (`real = stored * scale`). Scales are per layer, not per block,
so they add nothing to `bytes_per_block`; they are part of the spec's equality (two caches
with other scales hold other numbers for the same bytes).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

from engine.errors import EngineConfigError

KV_DTYPE_ITEMSIZE: Mapping[str, int] = MappingProxyType(
    {
        "float32": 4,
        "float16": 2,
        "bfloat16": 2,
        "float8_e4m3fn": 1,
        "float8_e5m2": 1,
    }
)
SCALED_KV_DTYPES = frozenset({"float8_e4m3fn", "float8_e5m2"})
# The largest finite value of each scaled dtype: stores clamp to it (e4m3fn has no infinity;
# an out-of-range cast would give NaN), calibration divides amax by it.
KV_DTYPE_MAX: Mapping[str, float] = MappingProxyType(
    {"float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}
)


class KVSpecError(EngineConfigError):
    """A KV cache description is invalid; `field` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def dtype_name(dtype: object) -> str:
    """The spec's name of a torch dtype (`torch.bfloat16` -> "bfloat16"); strings pass through."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class LayerScales:
    """One layer's dequantization scales: a stored key is `k_scale` times its stored value."""

    k_scale: float
    v_scale: float

    def as_tuple(self) -> tuple[float, float]:
        return (float(self.k_scale), float(self.v_scale))


def unit_scales(num_layers: int) -> tuple[LayerScales, ...]:
    """Scales of 1.0 for every layer: the stored value is the real one (the default)."""
    return (LayerScales(1.0, 1.0),) * num_layers


@dataclass(frozen=True)
class KVCacheSpec:
    """The geometry and element type of a paged KV cache, as one TP rank holds it.

    `num_kv_heads` is the model's (all ranks); a rank holds `num_local_heads` of them (heads
    are split evenly, or replicated when there are fewer heads than ranks). Byte counts and
    shapes take an optional `num_heads` and default to the local heads: what this rank
    allocates. A transfer or the router's cost counts every head: `bytes_per_token(num_kv_heads)`.
    Raises KVSpecError (an EngineConfigError) naming the field for any invalid value.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    kv_dtype: str
    tp_size: int = 1
    scales: tuple[LayerScales, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "tp_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KVSpecError(name, f"must be an int >= 1, got {value!r}")
        self._check_tp()
        if self.kv_dtype not in KV_DTYPE_ITEMSIZE:
            known = sorted(KV_DTYPE_ITEMSIZE)
            raise KVSpecError("kv_dtype", f"{self.kv_dtype!r} is not one of {known}")
        self._check_scales()

    def _check_tp(self) -> None:
        heads, tp = self.num_kv_heads, self.tp_size
        if heads >= tp and heads % tp:
            raise KVSpecError("num_kv_heads", f"{heads} not divisible by tp_size {tp}")
        if heads < tp and tp % heads:
            raise KVSpecError("tp_size", f"{tp} not divisible by num_kv_heads {heads}")

    def _check_scales(self) -> None:
        if self.kv_dtype not in SCALED_KV_DTYPES:
            if self.scales is not None:
                raise KVSpecError("scales", f"given for {self.kv_dtype!r}, stored unscaled")
            return
        if self.scales is not None and not (
            isinstance(self.scales, tuple) and all(isinstance(s, LayerScales) for s in self.scales)
        ):
            raise KVSpecError("scales", "must be a tuple of LayerScales (frozen, hashable)")
        if self.scales is None or len(self.scales) != self.num_layers:
            got = "none" if self.scales is None else len(self.scales)
            wanted = f"one per layer ({self.num_layers})"
            raise KVSpecError("scales", f"{self.kv_dtype!r} needs {wanted}, got {got}")
        for i, s in enumerate(self.scales):
            if not all(math.isfinite(x) and x > 0 for x in (s.k_scale, s.v_scale)):
                raise KVSpecError("scales", f"layer {i}: scales must be finite and > 0, got {s}")

    @property
    def num_local_heads(self) -> int:
        """KV heads one rank holds."""
        return max(1, self.num_kv_heads // self.tp_size)

    @property
    def itemsize(self) -> int:
        """Bytes of one stored element."""
        return KV_DTYPE_ITEMSIZE[self.kv_dtype]

    @property
    def is_scaled(self) -> bool:
        return self.kv_dtype in SCALED_KV_DTYPES

    def layer_scales(self, layer: int) -> LayerScales:
        """Layer `layer`'s scales; 1.0 for an unscaled cache."""
        return self.scales[layer] if self.scales is not None else LayerScales(1.0, 1.0)

    def scales_digest(self) -> str:
        """16 hex digits naming the scales ("" when unscaled): what the block-hash salt and the
        transfer handle carry, so caches with other scales never share or mix blocks. Exact:
        `float.hex` of every scale, no rounding."""
        if self.scales is None:
            return ""
        text = ";".join(f"{float(s.k_scale).hex()},{float(s.v_scale).hex()}" for s in self.scales)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def block_shape(self, num_heads: int | None = None) -> tuple[int, int, int, int, int]:
        """One block: [num_layers, 2, block_size, heads, head_dim] (default: local heads)."""
        heads = self.num_local_heads if num_heads is None else num_heads
        return (self.num_layers, 2, self.block_size, heads, self.head_dim)

    def cache_shape(self, num_blocks: int) -> tuple[int, int, int, int, int, int]:
        """One rank's cache: [num_layers, 2, num_blocks, block_size, local heads, head_dim]."""
        layers, two, block_size, heads, head_dim = self.block_shape()
        return (layers, two, num_blocks, block_size, heads, head_dim)

    def bytes_per_token(self, num_heads: int | None = None) -> int:
        """K and V bytes of one token over every layer (default: local heads)."""
        heads = self.num_local_heads if num_heads is None else num_heads
        return 2 * self.num_layers * heads * self.head_dim * self.itemsize

    def bytes_per_block(self, num_heads: int | None = None) -> int:
        """Bytes of one block over every layer (default: local heads): the allocation unit."""
        return self.block_size * self.bytes_per_token(num_heads)

    def with_tp(self, tp_size: int) -> KVCacheSpec:
        """The same cache split over `tp_size` ranks (1: every head in one cache, as a
        whole-group view presents it)."""
        return replace(self, tp_size=tp_size)
