"""FP8 KV across the cluster's byte movers: both transports (grpc, torch_p2p over gloo) and the
fake copy FP8 blocks byte for byte; the handle carries the scales' digest over the wire; a
destination of another KV dtype or other scales is refused naming kv_cache_dtype; the CPU tier
and the preemption swap round-trip FP8 blocks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from engine.attention.torch_backend import quantize_kv
from engine.kv.spec import KVCacheSpec, LayerScales
from engine.runner.kv_cache import allocate_kv_cache
from kvtransfer.cache_view import KVCacheView
from kvtransfer.errors import KVLayoutError
from kvtransfer.handle import KVHandle, KVLayout
from kvtransfer.interfaces import KVPoll
from kvtransfer.receiver import ThreadedReceiver
from kvtransfer.sender import LeasedSender, view_layout
from kvtransfer.tiers.store import TieredStore
from kvtransfer.transports.fake import FakeFabric, FakeReceiver, FakeSender
from kvtransfer.transports.grpc_stream import GrpcReceiver, GrpcSender
from kvtransfer.transports.torch_p2p import P2PLink, TorchP2PReceiver, TorchP2PSender
from tests.distributed.kv_links import in_process_links
from tests.engine.test_kvtransfer_conformance import FakeClock, Harness, Released, wait_terminal

L, N, BS, H, D = 2, 24, 4, 2, 16
SCALES = (LayerScales(0.05, 0.5), LayerScales(0.1, 0.25))
FP8 = KVCacheSpec(L, H, D, BS, "float8_e4m3fn", scales=SCALES)
CHUNK = 2 * L * 2 * BS * H * D  # two FP8 blocks per chunk: several chunks per transfer


def fp8_view(spec: KVCacheSpec = FP8, seed: int = 0) -> KVCacheView:
    """A cache of `spec` holding quantized N(0, 1) values."""
    real = torch.randn(spec.cache_shape(N), generator=torch.Generator().manual_seed(seed))
    return KVCacheView(quantize_kv(real, getattr(torch, spec.kv_dtype), 0.01), spec=spec)


def _harness(kind: str, src: KVCacheView, dst: KVCacheView) -> tuple[Harness, list[P2PLink]]:
    sent, received, clock = Released(), Released(), FakeClock()
    common = dict(model_salt="m", on_release=sent, lease_s=60.0, clock=clock)
    links: list[P2PLink] = []
    p2p: tuple[int, ...] = ()
    if kind == "fake":
        fabric = FakeFabric()
        sender: LeasedSender = FakeSender(fabric, "p0", src, **common)
        receiver: ThreadedReceiver = FakeReceiver(
            fabric, dst, on_release=received, timeout_s=2.0, chunk_bytes=CHUNK
        )
    elif kind == "grpc":
        sender = GrpcSender(src, worker_id="p0", chunk_bytes=CHUNK, **common)
        receiver = GrpcReceiver(dst, on_release=received, timeout_s=2.0, chunk_bytes=CHUNK)
    else:
        links = in_process_links(2, timeout_s=20.0, rebuild_timeout_s=5.0)
        sender = TorchP2PSender(src, links[0], worker_id="p0", send_timeout_s=2.0, **common)
        receiver = TorchP2PReceiver(dst, links[1], on_release=received, timeout_s=2.0)
        p2p = (0,)
    harness = Harness(sender, receiver, src, dst, sent, received, clock, lambda: None, p2p)
    return harness, links


@pytest.fixture(params=["fake", "grpc", "torch_p2p"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def run(kind: str) -> Iterator[list[tuple[Harness, list[P2PLink]]]]:
    made: list[tuple[Harness, list[P2PLink]]] = []
    yield made
    for harness, links in made:
        harness.receiver.close()
        harness.sender.close()
        for link in links:
            link.close()


def _transfer(kind: str, made: list, src: KVCacheView, dst: KVCacheView, ids: list[int]) -> KVPoll:
    harness, links = _harness(kind, src, dst)
    made.append((harness, links))
    handle = harness.register(ids)
    harness.receiver.start(KVHandle.from_bytes(handle.to_bytes()), ids)
    return wait_terminal(harness, handle.transfer_id)


def test_fp8_blocks_move_byte_for_byte(kind: str, run: list) -> None:
    src, dst = fp8_view(), KVCacheView(allocate_kv_cache(FP8, N, torch.device("cpu")), spec=FP8)
    ids = [3, 17, 5, 9, 22, 1, 12]
    assert _transfer(kind, run, src, dst, ids) is KVPoll.DONE
    assert torch.equal(
        dst.read_blocks(ids).view(torch.uint8), src.read_blocks(ids).view(torch.uint8)
    )


@pytest.mark.parametrize(
    "other,field",
    [
        (KVCacheSpec(L, H, D, BS, "bfloat16"), "bfloat16"),
        (KVCacheSpec(L, H, D, BS, "float8_e5m2", scales=SCALES), "float8_e5m2"),
        (KVCacheSpec(L, H, D, BS, "float8_e4m3fn", scales=SCALES[::-1]), "other scales"),
    ],
)
def test_a_destination_of_another_kv_dtype_or_scales_is_refused(
    kind: str, run: list, other: KVCacheSpec, field: str
) -> None:
    """The receiver's `start` checks the handle's layout against its cache before a byte moves
    (kvtransfer/handle.py `check_compatible`: refused, not converted)."""
    dst = KVCacheView(allocate_kv_cache(other, N, torch.device("cpu")), spec=other)
    harness, links = _harness(kind, fp8_view(), dst)
    run.append((harness, links))
    handle = KVHandle.from_bytes(harness.register([2, 3]).to_bytes())
    with pytest.raises(KVLayoutError, match=f"kv_cache_dtype: .*{field}"):
        harness.receiver.start(handle, [2, 3])


def test_handle_carries_the_scales_digest_over_the_wire() -> None:
    layout = view_layout(fp8_view())
    assert layout.scales == FP8.scales_digest() and len(layout.scales) == 16
    handle = KVHandle("t", "w", ("a",), layout, (3, 4), (), 5, "m")
    assert handle.to_proto().layout.dtype == f"float8_e4m3fn#{layout.scales}"
    decoded = KVHandle.from_bytes(handle.to_bytes())
    assert decoded.layout == layout and decoded.num_bytes == 2 * FP8.bytes_per_block()
    with pytest.raises(KVLayoutError) as info:
        decoded.layout.check_compatible(KVLayout.from_spec(KVCacheSpec(L, H, D, BS, "bfloat16")))
    assert info.value.field == "dtype"
    with pytest.raises(KVLayoutError):  # an FP8 layout without scales is not a layout
        KVLayout(1, H, D, L, BS, "float8_e4m3fn")


def test_cpu_tier_and_preemption_swap_round_trip_fp8() -> None:
    src = fp8_view()
    dst = KVCacheView(allocate_kv_cache(FP8, N, torch.device("cpu")), spec=FP8)
    store = TieredStore(src, model_salt="m", cpu_bytes=16 * FP8.bytes_per_block(), pin_memory=False)
    try:
        assert store.bytes_per_block == FP8.bytes_per_block() == L * 2 * BS * H * D  # 1 byte each
        handle = store.swap_out(src, [4, 9, 11])
        store.swap_in(handle, dst, [7, 8, 2])
        assert torch.equal(
            dst.read_blocks([7, 8, 2]).view(torch.uint8),
            src.read_blocks([4, 9, 11]).view(torch.uint8),
        )
    finally:
        store.close()


def test_a_head_slice_of_fp8_blocks_reads_and_writes() -> None:
    """Sub-word head slices (reshard) fall back to byte-wise copies, never an FP8 index op."""
    spec = KVCacheSpec(L, 4, 4, BS, "float8_e4m3fn", scales=SCALES)  # 4-byte heads: not words
    src, dst = (
        fp8_view(spec),
        KVCacheView(allocate_kv_cache(spec, N, torch.device("cpu")), spec=spec),
    )
    dst.write_blocks([5, 6], src.read_blocks([1, 2], heads=(1, 3)), heads=(0, 2))
    want = src.read_blocks([1, 2], heads=(1, 3)).view(torch.uint8)
    assert torch.equal(dst.read_blocks([5, 6], heads=(0, 2)).view(torch.uint8), want)
    with pytest.raises(KVLayoutError, match="no cast"):
        dst.write_blocks([5], torch.zeros(L, 2, 1, BS, 4, 4))
