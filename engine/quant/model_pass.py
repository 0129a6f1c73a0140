"""The quantization pass: give every column- and row-parallel linear of a built model its method.

Run by engine.weights before a checkpoint (or dummy weights) loads, on the model as its file
built it (model files never see quantization, as they never see TP). Embeddings and the LM
head are not linear layers here: they stay in the model dtype.

Hazard: the model is first built with unquantized weights, which this pass frees layer by
layer; the peak is the model in its own dtype. On CUDA the freed blocks stay in torch's cache
until `release_cached_memory` (engine.weights calls it after loading), which the KV cache sizing
would otherwise count as used.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.config import ModelConfig
from engine.errors import EngineConfigError
from engine.layers.linear import LinearBase, LinearMethod
from engine.quant.fp8 import Fp8LinearMethod, check_fp8_device
from engine.quant.int4 import Int4LinearMethod
from engine.quant.names import PACKED_INT4


def linear_method(
    cfg: ModelConfig, device: torch.device, from_checkpoint: bool = True
) -> LinearMethod | None:
    """The method `cfg.quantization` names (None: unquantized); `from_checkpoint` False: the
    weights come as floats (dummy weights) even where the checkpoint is quantized. Raises
    EngineConfigError naming `quantization` where the device cannot run it."""
    if cfg.quantization is None:
        return None
    if cfg.quantization == "gguf":
        if not from_checkpoint:
            raise EngineConfigError(
                "quantization: 'gguf' serves a GGUF file's own tensors; load_format='dummy' "
                "has none (use 'int4' for 4-bit dummy weights)"
            )
        return None  # engine.gguf.native gives each layer its method from the file's types
    if cfg.quantization in PACKED_INT4:
        if from_checkpoint and cfg.quantized_checkpoint:
            return None  # engine.quant.awq_gptq.packed_tensors gives the packed layers theirs
        return Int4LinearMethod()  # dummy weights: the same 4-bit storage, quantized on load
    if cfg.quantization == "fp8":
        check_fp8_device(device)
        return Fp8LinearMethod(prequantized=cfg.quantized_checkpoint and from_checkpoint)
    assert cfg.quantization == "int4", cfg.quantization  # ModelConfig validated the name
    return Int4LinearMethod()


def quantize_linears(model: nn.Module, from_checkpoint: bool = True) -> int:
    """Give each linear layer the method of `model.config` (see `linear_method`); returns the
    number of layers changed (0: unquantized). Their weights are left empty: load them next."""
    cfg: ModelConfig = model.config  # type: ignore[assignment]
    device = next(model.parameters()).device
    method = linear_method(cfg, device, from_checkpoint)
    if method is None:
        return 0
    changed = 0
    for name, module in model.named_modules():
        if isinstance(module, LinearBase):
            try:
                module.set_method(method)
            except EngineConfigError as err:
                raise EngineConfigError(f"{err} (layer {name})") from None
            changed += 1
    return changed


def release_cached_memory(model: nn.Module) -> None:
    """Return the blocks the replaced weights held to the driver (CUDA only; no-op elsewhere)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.empty_cache()
