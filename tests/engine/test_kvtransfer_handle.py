"""KVHandle protobuf round trip and validation; KVCacheView block reads and writes."""

from __future__ import annotations

import pytest
import torch

from engine.kv.block_hash import hash_blocks
from kvtransfer.cache_view import KVCacheView, TPLayout
from kvtransfer.errors import HandleDecodeError, InvalidBlockIdsError, KVLayoutError
from kvtransfer.handle import KVHandle, KVLayout


def handle(**overrides: object) -> KVHandle:
    fields: dict[str, object] = dict(
        transfer_id="t",
        source_worker_id="p0",
        source_addresses=("127.0.0.1:1", "127.0.0.1:2"),
        layout=KVLayout(2, 8, 128, 32, 16, "bfloat16"),
        block_ids=(5, 9, 2),
        block_hashes=tuple(hash_blocks(list(range(32)), 16, "m")),
        num_tokens=40,
        model_salt="m",
        source_p2p_ranks=(0, 1),
    )
    fields.update(overrides)
    return KVHandle(**fields)  # type: ignore[arg-type]


def test_round_trip_through_bytes() -> None:
    h = handle()
    assert KVHandle.from_bytes(h.to_bytes()) == h


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("source_addresses", ("a",)),
        ("num_tokens", 49),
        ("transfer_id", ""),
        ("block_hashes", (b"short",)),
    ],
)
def test_invalid_fields_are_named(field: str, value: object) -> None:
    with pytest.raises(KVLayoutError) as info:
        handle(**{field: value})
    assert info.value.field == field


def test_garbage_bytes_raise_decode_error() -> None:
    with pytest.raises(HandleDecodeError):
        KVHandle.from_bytes(b"\xff\xff\xff")
    msg = handle().to_proto()
    msg.spec_version = 99
    with pytest.raises(HandleDecodeError):
        KVHandle.from_bytes(msg.SerializeToString())


def test_view_read_write_blocks_and_head_slices() -> None:
    view = KVCacheView(torch.zeros(2, 2, 6, 4, 2, 8), TPLayout(1, 2, 4))
    data = torch.randn(2, 2, 2, 4, 1, 8)
    view.write_blocks([3, 1], data, heads=(1, 2))
    assert torch.equal(view.read_blocks([3, 1], heads=(1, 2)), data)
    assert not view.read_blocks([3, 1], heads=(0, 1)).any()
    assert view.bytes_per_block() == 2 * 2 * 4 * 2 * 8 * 4
    with pytest.raises(InvalidBlockIdsError):
        view.read_blocks([0])
    with pytest.raises(KVLayoutError):
        view.write_blocks([1], torch.zeros(2, 2, 2, 4, 2, 8))
    with pytest.raises(KVLayoutError):
        KVCacheView(torch.zeros(2, 2, 6, 4, 3, 8), TPLayout(0, 2, 4))
