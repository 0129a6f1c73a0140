"""KVHandle: everything a receiver needs to pull one request's KV blocks from a prefill worker.

It travels through the router as opaque bytes (`to_bytes` / `from_bytes`: protobuf
`tandem.v1.KVHandleProto`, never pickle). Block ids are the same on every source TP rank (rank
0 schedules, the others mirror its block table); each source rank serves its own head slice at
`source_addresses[rank]`.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from engine.kv.block_hash import BLOCK_HASH_BYTES, BLOCK_HASH_SPEC_VERSION
from engine.kv.spec import KV_DTYPE_ITEMSIZE, SCALED_KV_DTYPES, KVCacheSpec
from kvtransfer.errors import HandleDecodeError, KVLayoutError
from kvtransfer.reshard import check_tp
from tandem.api import kvtransfer_pb2 as pb

SUPPORTED_DTYPES = tuple(KV_DTYPE_ITEMSIZE)


@dataclass(frozen=True)
class KVLayout:
    """The source's cache geometry; the receiver's must match except for tp_size.

    The wire form of a KVCacheSpec (`from_spec`; protobuf `tandem.v1.KVLayout`). A scaled (FP8)
    cache's per-layer scales travel as their digest (`KVCacheSpec.scales_digest`), on the wire
    inside the dtype string, "float8_e4m3fn#<digest>" (the proto has no field for it; a
    receiver that predates scales rejects that dtype, which is the right outcome).

    Prefill and decode pools with different KV dtypes or scales are refused, not converted:
    `check_compatible` raises KVLayoutError naming kv_cache_dtype (the receiver calls it before
    it moves a byte). Converting would cost a dequantize + requantize pass per transfer and
    hide a deployment mistake; the pools' configs must agree."""

    tp_size: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    block_size: int
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"
    scales: str = ""  # the scales' digest of a scaled (FP8) cache, "" for others

    def __post_init__(self) -> None:
        check_tp(self.tp_size, self.num_kv_heads)
        for name in ("head_dim", "num_layers", "block_size"):
            if getattr(self, name) < 1:
                raise KVLayoutError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.dtype not in SUPPORTED_DTYPES:
            raise KVLayoutError("dtype", f"{self.dtype!r} not in {SUPPORTED_DTYPES}")
        if bool(self.scales) != (self.dtype in SCALED_KV_DTYPES):
            raise KVLayoutError("scales", f"{self.scales!r} does not fit dtype {self.dtype!r}")

    @property
    def wire_dtype(self) -> str:
        """The proto's dtype string: the dtype, and "#<scales digest>" for a scaled cache."""
        return f"{self.dtype}#{self.scales}" if self.scales else self.dtype

    @staticmethod
    def parse_wire_dtype(wire: str) -> tuple[str, str]:
        """(dtype, scales digest) of a `wire_dtype` string."""
        dtype, _, scales = wire.partition("#")
        return dtype, scales

    @classmethod
    def from_spec(cls, spec: KVCacheSpec) -> KVLayout:
        return cls(
            spec.tp_size,
            spec.num_kv_heads,
            spec.head_dim,
            spec.num_layers,
            spec.block_size,
            spec.kv_dtype,
            spec.scales_digest(),
        )

    def bytes_per_block(self) -> int:
        """Bytes of one block over every layer and every head (all source ranks together)."""
        elements = self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim
        return elements * KV_DTYPE_ITEMSIZE[self.dtype]

    def check_compatible(self, other: KVLayout) -> None:
        """Raises KVLayoutError naming the first field (other than tp_size) that differs; a KV
        dtype or scales mismatch names kv_cache_dtype (the pools' configs disagree)."""
        if self.dtype != other.dtype:
            raise KVLayoutError(
                "dtype",
                f"kv_cache_dtype: source stores {self.dtype}, destination {other.dtype}; prefill "
                f"and decode pools must use the same kv_cache_dtype (KV is not converted)",
            )
        if self.scales != other.scales:
            raise KVLayoutError(
                "scales",
                f"kv_cache_dtype: source and destination {self.dtype} caches have other scales "
                f"({self.scales} != {other.scales}); give both pools the same checkpoint scales "
                f"or calculate_kv_scales setting and model",
            )
        for name in ("num_kv_heads", "head_dim", "num_layers", "block_size"):
            if getattr(self, name) != getattr(other, name):
                raise KVLayoutError(
                    name, f"source {getattr(self, name)} != destination {getattr(other, name)}"
                )


@dataclass(frozen=True)
class KVHandle:
    transfer_id: str
    source_worker_id: str
    source_addresses: tuple[str, ...]  # one per source TP rank
    layout: KVLayout
    block_ids: tuple[int, ...]
    block_hashes: tuple[bytes, ...]  # hashes of the full blocks (a prefix of block_ids)
    num_tokens: int
    model_salt: str
    source_p2p_ranks: tuple[int, ...] = ()  # rank per source TP rank in a shared group; () if none
    spec_version: int = BLOCK_HASH_SPEC_VERSION

    def __post_init__(self) -> None:
        if not self.transfer_id:
            raise KVLayoutError("transfer_id", "must not be empty")
        if len(self.source_addresses) != self.layout.tp_size:
            raise KVLayoutError(
                "source_addresses", f"{len(self.source_addresses)} != tp_size {self.layout.tp_size}"
            )
        if self.source_p2p_ranks and len(self.source_p2p_ranks) != self.layout.tp_size:
            raise KVLayoutError("source_p2p_ranks", f"{len(self.source_p2p_ranks)} != tp_size")
        if len(self.block_hashes) > len(self.block_ids):
            raise KVLayoutError("block_hashes", "more hashes than blocks")
        if any(len(h) != BLOCK_HASH_BYTES for h in self.block_hashes):
            raise KVLayoutError("block_hashes", f"every hash must be {BLOCK_HASH_BYTES} bytes")
        if not 0 <= self.num_tokens <= len(self.block_ids) * self.layout.block_size:
            raise KVLayoutError(
                "num_tokens", f"{self.num_tokens} does not fit {len(self.block_ids)} blocks"
            )

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)

    @property
    def num_bytes(self) -> int:
        """KV bytes the transfer moves (every block, layer and head): half for FP8 vs bf16."""
        return self.num_blocks * self.layout.bytes_per_block()

    def to_bytes(self) -> bytes:
        return self.to_proto().SerializeToString()

    def to_proto(self) -> pb.KVHandleProto:
        lay = self.layout
        return pb.KVHandleProto(
            spec_version=self.spec_version,
            transfer_id=self.transfer_id,
            source_worker_id=self.source_worker_id,
            source_addresses=list(self.source_addresses),
            source_p2p_ranks=list(self.source_p2p_ranks),
            layout=pb.KVLayout(
                tp_size=lay.tp_size,
                num_kv_heads=lay.num_kv_heads,
                head_dim=lay.head_dim,
                num_layers=lay.num_layers,
                block_size=lay.block_size,
                dtype=lay.wire_dtype,
            ),
            block_ids=list(self.block_ids),
            block_hashes=list(self.block_hashes),
            num_tokens=self.num_tokens,
            model_salt=self.model_salt,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> KVHandle:
        """Decodes and validates; raises HandleDecodeError (never returns a half-valid handle)."""
        msg = pb.KVHandleProto()
        try:
            msg.ParseFromString(data)
        except DecodeError as exc:
            raise HandleDecodeError(f"not a KVHandleProto: {exc}") from exc
        try:
            return cls._from_proto(msg)
        except KVLayoutError as exc:
            raise HandleDecodeError(f"invalid handle: {exc}") from exc

    @classmethod
    def _from_proto(cls, msg: pb.KVHandleProto) -> KVHandle:
        if msg.spec_version != BLOCK_HASH_SPEC_VERSION:
            raise KVLayoutError("spec_version", f"{msg.spec_version} != {BLOCK_HASH_SPEC_VERSION}")
        lay = msg.layout
        dtype, scales = KVLayout.parse_wire_dtype(lay.dtype)
        return cls(
            transfer_id=msg.transfer_id,
            source_worker_id=msg.source_worker_id,
            source_addresses=tuple(msg.source_addresses),
            layout=KVLayout(
                lay.tp_size,
                lay.num_kv_heads,
                lay.head_dim,
                lay.num_layers,
                lay.block_size,
                dtype,
                scales,
            ),
            block_ids=tuple(msg.block_ids),
            block_hashes=tuple(msg.block_hashes),
            num_tokens=msg.num_tokens,
            model_salt=msg.model_salt,
            source_p2p_ranks=tuple(msg.source_p2p_ranks),
            spec_version=msg.spec_version,
        )
