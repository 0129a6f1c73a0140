"""Triton kernels for the GPU engine. Each module holds one kernel, its launcher and its torch
reference. Model layers call the re-exports below on CUDA tensors (the `*_ref` functions serve
CPU); attention kernels are reached through `engine.attention.triton_backend`."""

from engine.kernels.fused_add_rmsnorm import (
    fused_add_rmsnorm,
    fused_add_rmsnorm_ref,
    rmsnorm,
    rmsnorm_ref,
)
from engine.kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref

__all__ = [
    "fused_add_rmsnorm",
    "fused_add_rmsnorm_ref",
    "rmsnorm",
    "rmsnorm_ref",
    "silu_and_mul",
    "silu_and_mul_ref",
]
