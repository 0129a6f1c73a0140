"""The `quantization` option's values and what a checkpoint's config.json says about its weights.

Pure (no torch): engine.config validates with it. Errors are EngineConfigError naming
`quantization`, raised while the configs are built, before any weight is read.
"""

from __future__ import annotations

from typing import Any

from engine.errors import EngineConfigError

# what `quantization` accepts (None: the model dtype); "gguf": a GGUF file's Q4_0 / Q4_1 / Q8_0
# linear tensors served as they are (engine.gguf.native); "awq" / "gptq": such a checkpoint's
# 4-bit tensors served as they are (engine.quant.awq_gptq; the option must match the checkpoint)
QUANTIZATIONS = ("fp8", "int4", "gguf", "awq", "gptq")
NOT_YET: tuple[str, ...] = ()  # named by the issue, not served yet: a clear error, not "unknown"
# quant_method values of Hugging Face checkpoints this engine loads as they are
PREQUANTIZED = ("fp8", "awq", "gptq")
# the 4-bit packed formats: repacked on load into the W4A16 layout (engine.quant.awq_gptq)
PACKED_INT4 = ("awq", "gptq")
PACKED_GROUP_SIZES = (
    32,
    64,
    128,
)  # engine.kernels.w4a16.GROUP_SIZES (this module imports no torch)
GPTQ_FORMATS = ("gptq", "gptq_v2")  # v1 stores each zero point minus 1; v2 as it is


def check_quantization(name: str | None) -> None:
    """Raises EngineConfigError naming `quantization` unless `name` is None or supported."""
    if name is None or name in QUANTIZATIONS:
        return
    if name in NOT_YET:
        raise EngineConfigError(f"quantization: {name!r} is not supported yet")
    raise EngineConfigError(f"quantization: {name!r} is not None or one of {QUANTIZATIONS}")


def checkpoint_quantization(hf_config: dict[str, Any]) -> str | None:
    """The `quant_method` of config.json's `quantization_config` (None: float weights).

    Raises EngineConfigError for quantized layouts this engine cannot read (other methods,
    block-wise FP8 scales, AWQ / GPTQ variants `check_packed_int4` refuses), so that they never
    load as garbage."""
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
    if method in PACKED_INT4:
        check_packed_int4(method, qc)
    return method


def packed_format(qc: dict[str, Any]) -> str:
    """AWQ's `version` or GPTQ's `checkpoint_format` (transformers' newer name: `format`),
    lower case, with each tool's default ("gemm", "gptq") where the config names none."""
    method = qc.get("quant_method")
    legacy = qc.get("version") if method == "awq" else qc.get("checkpoint_format")
    value = legacy or qc.get("format") or ("gemm" if method == "awq" else "gptq")
    return str(value).lower()


def check_packed_int4(method: str, qc: dict[str, Any]) -> None:
    """EngineConfigError naming the `quantization_config` field an AWQ / GPTQ checkpoint's
    4-bit layers cannot be served with: bits other than 4, a group size the W4A16 kernel
    lacks (or -1, one group per column), AWQ other than "gemm" or without zero points, GPTQ
    formats other than v1 / v2, act-order (`desc_act`, its groups scattered along the input
    features) unless `static_groups` keeps them contiguous, or a quantized LM head."""
    where = f"quantization: {method!r} checkpoint, config.json quantization_config"
    if qc.get("bits") != 4:
        raise EngineConfigError(f"{where}.bits is {qc.get('bits')!r}; only 4-bit is served")
    if qc.get("group_size") not in PACKED_GROUP_SIZES:
        raise EngineConfigError(
            f"{where}.group_size is {qc.get('group_size')!r}; the 4-bit kernel takes groups "
            f"of {PACKED_GROUP_SIZES}"
        )
    fmt = packed_format(qc)
    if method == "awq":
        if fmt != "gemm":
            raise EngineConfigError(f"{where}.version is {fmt!r}; only AWQ 'gemm' is served")
        if qc.get("zero_point") is False:
            raise EngineConfigError(f"{where}.zero_point is false; only AWQ with zero points")
        return
    if fmt not in GPTQ_FORMATS:
        raise EngineConfigError(
            f"{where}.checkpoint_format is {fmt!r}; only {GPTQ_FORMATS} are served"
        )
    if qc.get("desc_act") and not qc.get("static_groups"):
        raise EngineConfigError(
            f"{where}.desc_act is true (act-order: each group's input features scattered by "
            "g_idx) and static_groups is not; only contiguous groups are served"
        )
    if qc.get("lm_head"):
        raise EngineConfigError(f"{where}.lm_head is true; the LM head must be unquantized")


def resolve_quantization(option: str | None, hf_config: dict[str, Any]) -> tuple[str | None, bool]:
    """(the method the linear layers use, whether the checkpoint already holds its weights).

    `option` None follows the checkpoint (an FP8, AWQ or GPTQ checkpoint serves as it is, as in
    vLLM); an option that contradicts the checkpoint's own quantization is an error naming
    both, as is "awq" / "gptq" for a checkpoint that is not one (they quantize nothing)."""
    check_quantization(option)
    on_disk = checkpoint_quantization(hf_config)
    if on_disk is None:
        if option in PACKED_INT4:
            raise EngineConfigError(
                f"quantization: {option!r} serves {option.upper()} checkpoints, and config.json "
                "has no quantization_config ('int4' quantizes float weights on load)"
            )
        return option, False
    if option is not None and option != on_disk:
        raise EngineConfigError(
            f"quantization: {option!r} contradicts the checkpoint, whose config.json "
            f"quantization_config says {on_disk!r}"
        )
    return on_disk, True
