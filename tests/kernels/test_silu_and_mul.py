"""SiLU-and-multiply against F.silu(gate) * up."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref
from tests.kernels.kernel_cases import DEVICE, DTYPES, assert_close


def _rows(num_rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    return torch.empty(num_rows, width, dtype=dtype, device=DEVICE).normal_(generator=gen).mul_(3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows,inter", [(1, 64), (5, 1500), (3, 2048)])
def test_matches_reference(dtype: torch.dtype, num_rows: int, inter: int) -> None:
    x = _rows(num_rows, 2 * inter, dtype)
    out = silu_and_mul(x)
    assert out.shape == (num_rows, inter) and out.dtype == dtype
    assert_close(out, silu_and_mul_ref(x.float()), dtype)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(_rows(2, 63, torch.float32))
    with pytest.raises(ValueError, match="x"):
        silu_and_mul(_rows(2, 64, torch.float32)[None])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_full_shapes_gpu(dtype: torch.dtype) -> None:
    x = _rows(4096, 2 * 14336, dtype)
    assert_close(silu_and_mul(x), silu_and_mul_ref(x.float()), dtype)


@pytest.mark.gpu
def test_rows_beyond_int32_offsets_gpu() -> None:
    """[74899, 2 * 14336] bf16: more than 2^31 elements (~4.3 GB); the last rows are checked."""
    x = _rows(2**31 // (2 * 14336) + 8, 2 * 14336, torch.bfloat16)
    assert x.numel() > 2**31
    out = silu_and_mul(x)
    tail = slice(x.shape[0] - 4, x.shape[0])
    assert_close(out[tail], silu_and_mul_ref(x[tail].float()), torch.bfloat16)
