"""Argument checks shared by the Triton kernel launchers.

Every launcher validates shapes, dtypes, devices and contiguity before it launches, and raises
`ValueError` naming the argument: a bad launch would otherwise read or write out of bounds.
"""

from __future__ import annotations

import functools
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTERPRETER_NUM_SMS = 4  # stands in for the SM count on CPU so tests exercise splitting


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (launchers size split grids by it)."""
    if device.type != "cuda":
        return INTERPRETER_NUM_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sms(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1).

    Triton reads the variable when a kernel is decorated, so it must be set before any
    `engine.kernels` module is imported.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(name: str, tensor: torch.Tensor) -> None:
    """Triton needs CUDA tensors, or CPU tensors when the interpreter is on."""
    if tensor.is_cuda or (tensor.device.type == "cpu" and interpreter_enabled()):
        return
    raise ValueError(
        f"{name}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
        f"imported, for CPU tensors); got device {tensor.device}"
    )


def check_tensor(
    name: str,
    tensor: torch.Tensor,
    ndim: int,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
    contiguous: bool = True,
) -> None:
    """Rank, dtype, device and (optionally) contiguity of one launcher argument."""
    if tensor.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in dtypes:
        raise ValueError(f"{name}: dtype {tensor.dtype} not in {dtypes}")
    if contiguous and not tensor.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (shape {tuple(tensor.shape)})")
    check_device(name, tensor)


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors on different devices: {devices}")


def check_head_dim(head_dim: int) -> None:
    """The attention kernels tile the head dim whole: a power of two in [16, 256]."""
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim: must be a power of two in [16, 256], got {head_dim}")


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: exact ("ieee") for float32 so it matches the reference."""
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether kernels must feed `tl.dot` float32: the interpreter multiplies bfloat16 as raw
    uint16 bits, so on CPU bfloat16 operands are widened first (same math as the GPU's bf16
    MMA with float32 accumulation). Always False on CUDA, where it compiles away."""
    return interpreter_enabled() and dtype == torch.bfloat16


def check_rows(
    name: str, tensor: torch.Tensor, ndim: int, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
) -> None:
    """Like `check_tensor` for strided views (e.g. q/k/v split from one qkv projection): only the
    last dim must be contiguous."""
    check_tensor(name, tensor, ndim, dtypes, contiguous=False)
    if tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
        raise ValueError(f"{name}: last dim must be contiguous, got strides {tensor.stride()}")


def check_paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
) -> None:
    """The checks every paged-attention launcher shares: ranks, dtypes, devices, GQA shapes."""
    check_tensor("query", query, 3)
    check_tensor("k_cache", k_cache, 4)
    check_tensor("v_cache", v_cache, 4)
    check_tensor("block_tables", block_tables, 2, (torch.int32,))
    check_tensor("seq_lens", seq_lens, 1, (torch.int32,))
    check_same_device(query=query, k_cache=k_cache, block_tables=block_tables, seq_lens=seq_lens)
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(
            f"v_cache: shape/dtype {tuple(v_cache.shape)}/{v_cache.dtype} differ from k_cache"
        )
    if k_cache.dtype != query.dtype:
        raise ValueError(f"k_cache: dtype {k_cache.dtype} differs from query dtype {query.dtype}")
    num_heads, head_dim = query.shape[1:]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache: head_dim {k_cache.shape[3]} != query head_dim {head_dim}")
    check_head_dim(head_dim)
    if num_heads % k_cache.shape[2]:
        raise ValueError(
            f"query: num_heads {num_heads} not a multiple of num_kv_heads {k_cache.shape[2]}"
        )
