"""KV scale calibration: the torch backend over an unscaled cache, recording what it stores.

`calculate_kv_scales=True` (engine/config.py) runs one calibration prefill at start-up with this
backend (engine/runner/kv_cache.py `calibrate_kv_scales`) before the FP8 cache exists: every
layer's `store_kv` sees the rotated keys and the values exactly as the cache would store them,
and the recorder keeps the largest |K| and |V| of each layer. The scales are then
`amax / the format's largest finite value` (448 for e4m3), rounded up to a power of two: the
calibration's largest value lands in the format's top binade (224..448 for e4m3), dividing by
the scale is exact, and a slightly different amax (a prefill pool at another TP size or on
another GPU model calibrating the same model) lands on the same scale, so pools that calibrate
separately still agree (transfer handles compare the scales and refuse a mismatch).

Hazard: a later prompt with larger activations than the calibration's saturates (the store
clamps to the format's range, never NaN); the scales are fixed for the engine's lifetime
because they are part of the KVCacheSpec (the block-hash salt and transfer handles name them).
"""

from __future__ import annotations

import math

import torch

from engine.attention.backend import AttentionMetadata
from engine.attention.torch_backend import TorchAttentionBackend
from engine.kv.spec import KV_DTYPE_MAX, LayerScales


class KVAmaxRecorder(TorchAttentionBackend):
    """The torch backend (any unscaled cache) that also keeps each layer's max |K| and |V|."""

    name = "torch-calibration"

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.k_amax = [0.0] * num_layers
        self.v_amax = [0.0] * num_layers

    def store_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        layer: int | None = None,
    ) -> None:
        assert layer is not None, "calibration needs the layer index"
        self.k_amax[layer] = max(self.k_amax[layer], float(key.abs().max()))
        self.v_amax[layer] = max(self.v_amax[layer], float(value.abs().max()))
        super().store_kv(key, value, k_cache, v_cache, meta, layer)

    def scales(self, kv_dtype: str) -> tuple[LayerScales, ...]:
        """Per-layer scales for a `kv_dtype` cache: amax / its largest value (1.0 for a layer
        that stored only zeros)."""
        return scales_from_amax(self.k_amax, self.v_amax, kv_dtype)


def scales_from_amax(
    k_amax: list[float], v_amax: list[float], kv_dtype: str
) -> tuple[LayerScales, ...]:
    """`amax / KV_DTYPE_MAX[kv_dtype]` per layer, rounded up to a power of two; 1.0 where amax
    is 0 or not finite (nothing to scale by)."""
    fmax = KV_DTYPE_MAX[kv_dtype]

    def one(amax: float) -> float:
        if not 0 < amax < math.inf:
            return 1.0
        return 2.0 ** math.ceil(math.log2(amax / fmax))

    return tuple(LayerScales(one(k), one(v)) for k, v in zip(k_amax, v_amax, strict=True))
