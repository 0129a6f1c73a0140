"""RMSNorm and fused residual-add + RMSNorm against the Hugging Face formulation."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.fused_add_rmsnorm import (
    fused_add_rmsnorm,
    fused_add_rmsnorm_ref,
    rmsnorm,
    rmsnorm_ref,
)
from tests.kernels.kernel_cases import DEVICE, DTYPES, assert_close


def _rows(num_rows: int, hidden: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.empty(num_rows, hidden, dtype=dtype, device=DEVICE).normal_(generator=gen)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows,hidden", [(1, 64), (7, 300), (3, 1024)])
def test_fused_add_rmsnorm_matches_reference(
    dtype: torch.dtype, num_rows: int, hidden: int
) -> None:
    x, residual = _rows(num_rows, hidden, dtype, 0), _rows(num_rows, hidden, dtype, 1)
    weight = _rows(1, hidden, dtype, 2)[0]
    normed, new_residual = fused_add_rmsnorm(x, residual, weight, 1e-6)
    ref_normed, ref_residual = fused_add_rmsnorm_ref(
        x.float(), residual.float(), weight.float(), 1e-6
    )
    assert normed.dtype == dtype and new_residual.shape == x.shape
    assert_close(new_residual, ref_residual, dtype)
    assert_close(normed, ref_normed, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_matches_reference_on_strided_rows(dtype: torch.dtype) -> None:
    x = _rows(5, 2 * 384, dtype, 3)[:, :384]  # every other half-row: row stride 768
    weight = _rows(1, 384, dtype, 4)[0]
    assert_close(rmsnorm(x, weight, 1e-5), rmsnorm_ref(x.float(), weight.float(), 1e-5), dtype)


def test_rejects_bad_arguments() -> None:
    x, weight = _rows(2, 64, torch.float32, 0), _rows(1, 64, torch.float32, 1)[0]
    with pytest.raises(ValueError, match="weight"):
        rmsnorm(x, weight[:32], 1e-6)
    with pytest.raises(ValueError, match="weight"):
        rmsnorm(x, weight.half(), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rmsnorm(x, x[:1], weight, 1e-6)
    with pytest.raises(ValueError, match="eps"):
        rmsnorm(x, weight, 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [4096, 5120, 8192])
def test_full_shapes_gpu(dtype: torch.dtype, hidden: int) -> None:
    x, residual, weight = (
        _rows(4096, hidden, dtype, 0),
        _rows(4096, hidden, dtype, 1),
        _rows(1, hidden, dtype, 2)[0],
    )
    normed, new_residual = fused_add_rmsnorm(x, residual, weight, 1e-6)
    ref_normed, ref_residual = fused_add_rmsnorm_ref(
        x.float(), residual.float(), weight.float(), 1e-6
    )
    assert_close(new_residual, ref_residual, dtype)
    assert_close(normed, ref_normed, dtype)


@pytest.mark.gpu
def test_rows_beyond_int32_offsets_gpu() -> None:
    """[2^31 / 4096 + 8 rows, 4096] bf16 (~4.3 GB per tensor): the last rows sit past 2^31."""
    num_rows, hidden = 2**31 // 4096 + 8, 4096
    x, weight = _rows(num_rows, hidden, torch.bfloat16, 0), _rows(1, hidden, torch.bfloat16, 1)[0]
    out = rmsnorm(x, weight, 1e-6)
    tail = slice(num_rows - 16, num_rows)
    assert_close(out[tail], rmsnorm_ref(x[tail].float(), weight.float(), 1e-6), torch.bfloat16)


def test_fused_add_rmsnorm_rounds_a_float32_sum_first() -> None:
    """x in float32 (a row-parallel float32 sum): rounded to the residual's dtype before the add,
    as if the caller had cast it: bit for bit on a GPU; within bf16 tolerance in the Triton
    interpreter, which truncates float32 -> bfloat16 instead of rounding to nearest."""
    x, residual = _rows(4, 128, torch.float32, 5), _rows(4, 128, torch.bfloat16, 6)
    weight = _rows(1, 128, torch.bfloat16, 7)[0]
    normed, new_residual = fused_add_rmsnorm(x, residual, weight, 1e-6)
    want_normed, want_residual = fused_add_rmsnorm(x.to(torch.bfloat16), residual, weight, 1e-6)
    assert normed.dtype == new_residual.dtype == torch.bfloat16
    if DEVICE.type == "cuda":
        assert torch.equal(new_residual, want_residual) and torch.equal(normed, want_normed)
    else:
        assert_close(new_residual, want_residual.float(), torch.bfloat16)
        assert_close(normed, want_normed.float(), torch.bfloat16)
