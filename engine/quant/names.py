"""The `quantization` option's values and what a checkpoint's config.json says about its weights.

Pure (no torch): engine.config validates with it. Errors are EngineConfigError naming
`quantization`, raised while the configs are built, before any weight is read.
"""

from __future__ import annotations

from typing import Any

from engine.errors import EngineConfigError

# what `quantization` accepts (None: the model dtype); "gguf": a GGUF file's Q4_0 / Q4_1 / Q8_0
# linear tensors served as they are (engine.gguf.native)
QUANTIZATIONS = ("fp8", "int4", "gguf")
NOT_YET: tuple[str, ...] = ()  # named by the issue, not served yet: a clear error, not "unknown"
# quant_method values of Hugging Face checkpoints this engine loads as they are
PREQUANTIZED = ("fp8",)


def check_quantization(name: str | None) -> None:
    """Raises EngineConfigError naming `quantization` unless `name` is None or supported."""
    if name is None or name in QUANTIZATIONS:
        return
    if name in NOT_YET:
        raise EngineConfigError(f"quantization: {name!r} is not supported yet")
    raise EngineConfigError(f"quantization: {name!r} is not None or one of {QUANTIZATIONS}")


def checkpoint_quantization(hf_config: dict[str, Any]) -> str | None:
    """The `quant_method` of config.json's `quantization_config` (None: float weights).

    Raises EngineConfigError for quantized layouts this engine cannot read (GPTQ, AWQ, ...,
    or block-wise FP8 scales), so that they never load as garbage."""
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    method = str(qc.get("quant_method", "unknown"))
    if method not in PREQUANTIZED:
        raise EngineConfigError(
            f"quantization: the checkpoint is quantized with {method!r} (config.json "
            f"quantization_config); this engine loads {PREQUANTIZED} checkpoints"
        )
    if qc.get("weight_block_size"):
        raise EngineConfigError(
            "quantization: block-wise FP8 scales (quantization_config.weight_block_size "
            f"{qc['weight_block_size']}) are not supported; per-tensor or per-channel only"
        )
    return method


def resolve_quantization(option: str | None, hf_config: dict[str, Any]) -> tuple[str | None, bool]:
    """(the method the linear layers use, whether the checkpoint already holds its weights).

    `option` None follows the checkpoint (an FP8 checkpoint serves as FP8, as in vLLM); an
    option that contradicts the checkpoint's own quantization is an error naming both."""
    check_quantization(option)
    on_disk = checkpoint_quantization(hf_config)
    if on_disk is None:
        return option, False
    if option is not None and option != on_disk:
        raise EngineConfigError(
            f"quantization: {option!r} contradicts the checkpoint, whose config.json "
            f"quantization_config says {on_disk!r}"
        )
    return on_disk, True
