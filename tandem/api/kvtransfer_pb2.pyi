from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVLayout(_message.Message):
    __slots__ = ("tp_size", "num_kv_heads", "head_dim", "num_layers", "block_size", "dtype")
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    tp_size: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    block_size: int
    dtype: str
    def __init__(self, tp_size: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., num_layers: _Optional[int] = ..., block_size: _Optional[int] = ..., dtype: _Optional[str] = ...) -> None: ...

class KVHandleProto(_message.Message):
    __slots__ = ("spec_version", "transfer_id", "source_worker_id", "source_addresses", "source_p2p_ranks", "layout", "block_ids", "block_hashes", "num_tokens", "model_salt")
    SPEC_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_P2P_RANKS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODEL_SALT_FIELD_NUMBER: _ClassVar[int]
    spec_version: int
    transfer_id: str
    source_worker_id: str
    source_addresses: _containers.RepeatedScalarFieldContainer[str]
    source_p2p_ranks: _containers.RepeatedScalarFieldContainer[int]
    layout: KVLayout
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    num_tokens: int
    model_salt: str
    def __init__(self, spec_version: _Optional[int] = ..., transfer_id: _Optional[str] = ..., source_worker_id: _Optional[str] = ..., source_addresses: _Optional[_Iterable[str]] = ..., source_p2p_ranks: _Optional[_Iterable[int]] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ..., block_ids: _Optional[_Iterable[int]] = ..., block_hashes: _Optional[_Iterable[bytes]] = ..., num_tokens: _Optional[int] = ..., model_salt: _Optional[str] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("transfer_id", "head_start", "head_end", "max_chunk_bytes")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    HEAD_START_FIELD_NUMBER: _ClassVar[int]
    HEAD_END_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    head_start: int
    head_end: int
    max_chunk_bytes: int
    def __init__(self, transfer_id: _Optional[str] = ..., head_start: _Optional[int] = ..., head_end: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ...) -> None: ...

class BlockChunk(_message.Message):
    __slots__ = ("first_block", "num_blocks", "block_crc32", "data")
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_CRC32_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    first_block: int
    num_blocks: int
    block_crc32: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, first_block: _Optional[int] = ..., num_blocks: _Optional[int] = ..., block_crc32: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class AckRequest(_message.Message):
    __slots__ = ("transfer_id", "ok", "reason")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    ok: bool
    reason: str
    def __init__(self, transfer_id: _Optional[str] = ..., ok: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class AckReply(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: _Optional[bool] = ...) -> None: ...

class PrepareSendRequest(_message.Message):
    __slots__ = ("transfer_id", "receiver_rank", "head_start", "head_end", "epoch")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_RANK_FIELD_NUMBER: _ClassVar[int]
    HEAD_START_FIELD_NUMBER: _ClassVar[int]
    HEAD_END_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    receiver_rank: int
    head_start: int
    head_end: int
    epoch: int
    def __init__(self, transfer_id: _Optional[str] = ..., receiver_rank: _Optional[int] = ..., head_start: _Optional[int] = ..., head_end: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class PrepareSendReply(_message.Message):
    __slots__ = ("accepted", "reason", "num_bytes", "epoch", "retry")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    num_bytes: int
    epoch: int
    retry: bool
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., num_bytes: _Optional[int] = ..., epoch: _Optional[int] = ..., retry: _Optional[bool] = ...) -> None: ...
