"""The fused all-reduce + residual add + RMSNorm kernel, one rank's view (on CPU through the
Triton interpreter; two ranks on two GPUs in tests/distributed/test_tp_equality.py).

The peers' side is simulated: their rows already sit in their slots and their flags are raised
in this rank's flag array, as if they had arrived first."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.allreduce_add_rmsnorm import allreduce_add_rmsnorm
from engine.kernels.fused_add_rmsnorm import fused_add_rmsnorm_ref
from tests.kernels.kernel_cases import DEVICE, DTYPES, assert_close


def _rows(num_rows: int, hidden: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.empty(num_rows, hidden, dtype=dtype, device=DEVICE).normal_(generator=gen)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("world,rank", [(2, 0), (2, 1), (4, 2)])
def test_sums_every_rank_in_order_then_adds_and_normalises(
    dtype: torch.dtype, world: int, rank: int
) -> None:
    rows, hidden = 3, 96
    parts = [_rows(rows, hidden, dtype, seed) for seed in range(world)]
    residual, weight = _rows(rows, hidden, dtype, 10), _rows(1, hidden, dtype, 11)[0]
    data = [torch.zeros(rows * hidden, dtype=dtype, device=DEVICE) for _ in range(world)]
    flags = [torch.zeros(rows * world, dtype=torch.int32, device=DEVICE) for _ in range(world)]
    for peer in range(world):
        if peer != rank:
            data[peer].copy_(parts[peer].flatten())
            flags[rank].view(rows, world)[:, peer] = 1  # the peer arrived: its flag is up here
    failed = torch.zeros(1, dtype=torch.int32, device=DEVICE)

    normed, new_residual = allreduce_add_rmsnorm(
        parts[rank], residual, weight, 1e-6, data, flags, failed, rank
    )

    total = torch.zeros(rows, hidden, dtype=torch.float32, device=DEVICE)
    for p in parts:
        total += p.float()
    ref_normed, ref_residual = fused_add_rmsnorm_ref(
        total.to(dtype).float(), residual.float(), weight.float(), 1e-6
    )
    assert_close(new_residual, ref_residual, dtype)
    assert_close(normed, ref_normed, dtype)
    assert torch.equal(data[rank].view(rows, hidden), parts[rank])  # this rank's row, for its peers
    assert int(failed.item()) == 0
    assert torch.count_nonzero(flags[rank]) == 0  # every peer's flag consumed
    for peer in range(world):  # this rank's flag raised in every peer's array, nowhere else
        if peer != rank:
            column = flags[peer].view(rows, world)
            assert torch.all(column[:, rank] == 1) and torch.count_nonzero(column) == rows


def test_a_peer_that_never_arrives_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.kernels.allreduce_add_rmsnorm as kernel

    monkeypatch.setattr(kernel, "MAX_SPINS", 3)
    x, residual, weight = (
        _rows(1, 32, torch.float32, 0),
        _rows(1, 32, torch.float32, 1),
        _rows(1, 32, torch.float32, 2)[0],
    )
    data = [torch.zeros(32, device=DEVICE) for _ in range(2)]
    flags = [torch.zeros(2, dtype=torch.int32, device=DEVICE) for _ in range(2)]
    failed = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    allreduce_add_rmsnorm(x, residual, weight, 1e-6, data, flags, failed, rank=0)
    assert int(failed.item()) == 1
