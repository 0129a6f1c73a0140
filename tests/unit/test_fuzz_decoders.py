"""Every decoder of bytes from the network or another process answers random input with a
typed error or a valid result, never a crash (issue 21, item 7).

Decoders fuzzed (random bytes, and valid encodings flipped, truncated, extended or spliced):
- the router's lenient gRPC decoder (router/server.py `_DecodeCheck`, each tandem.v1.Generation
  request message) and `router.undecodable.bad_utf8_field`, then `router.validation.validate`
  of whatever parsed: a message or `_Undecodable`; a GenerateRequest or `RequestError`;
- `KVHandle.from_bytes`: a KVHandle or `HandleDecodeError`;
- the gRPC KV stream's chunk check (`GrpcReceiver._decode`): blocks or `TransferAbortedError`;
- the NVMe tier's block files (`NvmeTier.read`): the block written, or a miss;
- the step channel (`engine.executor.step_channel.decode`): a message or `StepMessageError`;
- the HTTP bodies (router/http/schemas.py): a model or pydantic's `ValidationError`.
Bounded (`max_examples`) so the module runs in a few seconds.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import grpc
import pytest
import torch
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ValidationError

from engine.executor.kv_ops import KVOp
from engine.executor.step_channel import (
    HEADER_LEN,
    MessageKind,
    StepMessageError,
    decode,
    pack,
    pack_kv,
)
from engine.kv.block_hash import BLOCK_HASH_BYTES, BLOCK_HASH_SPEC_VERSION
from engine.runner.inputs import StepInputs
from kvtransfer.cache_view import KVCacheView
from kvtransfer.errors import HandleDecodeError, TransferAbortedError
from kvtransfer.handle import KVHandle, KVLayout
from kvtransfer.receiver import Transfer
from kvtransfer.reshard import HeadSlice
from kvtransfer.tiers.nvme import NvmeTier
from kvtransfer.transports.grpc_stream import GrpcReceiver, block_bytes
from router.errors import RequestError
from router.http import schemas
from router.metrics import RouterMetrics
from router.server import SERVICE, _DecodeCheck, _Undecodable
from router.slo import DEFAULT_SLO_CLASSES
from router.tokenizer import ByteTokenizer
from router.undecodable import bad_utf8_field
from router.validation import ModelLimits, validate
from tandem.api import generation_pb2 as pb
from tandem.api import kvtransfer_pb2 as kb

FUZZ = settings(
    max_examples=int(os.environ.get("TANDEM_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}


# --- strategies -------------------------------------------------------------------------------
def _scalars(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    cpp = field.cpp_type
    if cpp in INT_RANGES:
        lo, hi = INT_RANGES[cpp]
        return st.one_of(st.integers(-3, 300).filter(lambda v: lo <= v <= hi), st.integers(lo, hi))
    if cpp == FieldDescriptor.CPPTYPE_FLOAT:
        return st.floats(width=32)
    if cpp == FieldDescriptor.CPPTYPE_DOUBLE:
        return st.floats()
    if cpp == FieldDescriptor.CPPTYPE_BOOL:
        return st.booleans()
    if cpp == FieldDescriptor.CPPTYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=40)
    return st.text(max_size=40)


@st.composite
def messages(draw: st.DrawFn, descriptor: Descriptor, depth: int = 0) -> Message:
    """A random valid message of `descriptor`: any subset of fields, any values of their type."""
    msg = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        sub = field.message_type
        if sub is not None and sub.GetOptions().map_entry:
            key, value = sub.fields_by_name["key"], sub.fields_by_name["value"]
            if value.message_type is None:
                target = getattr(msg, field.name)
                for k, v in draw(
                    st.dictionaries(_scalars(key), _scalars(value), max_size=3)
                ).items():
                    target[k] = v
        elif sub is not None:
            if depth < 3:
                count = draw(st.integers(1, 3)) if _repeated(field) else 1
                for _ in range(count):
                    inner = draw(messages(sub, depth + 1))
                    target = getattr(msg, field.name)
                    (target.add() if _repeated(field) else target).CopyFrom(inner)
        elif _repeated(field):
            getattr(msg, field.name).extend(draw(st.lists(_scalars(field), max_size=4)))
        else:
            setattr(msg, field.name, draw(_scalars(field)))
    return msg


def _repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _mutate(args: tuple[bytes, str, int, bytes]) -> bytes:
    data, how, at, extra = args
    i = at % (len(data) + 1)
    if how == "flip" and data:
        i %= len(data)
        return data[:i] + bytes([data[i] ^ (extra[0] or 0xFF)]) + data[i + 1 :]
    if how == "truncate":
        return data[:i]
    if how == "splice":
        return data[:i] + extra + data[i:]
    return data + extra


def mutated(valid: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Valid encodings with one byte flipped, cut short, or random bytes inserted or appended."""
    how = st.sampled_from(["flip", "truncate", "splice", "extend"])
    extra = st.binary(min_size=1, max_size=12)
    return st.tuples(valid, how, st.integers(0, 2**16), extra).map(_mutate)


def wire(descriptor: Descriptor) -> st.SearchStrategy[bytes]:
    """Random bytes, valid encodings of `descriptor` and mutations of them."""
    valid = messages(descriptor).map(lambda m: m.SerializeToString())
    return st.one_of(st.binary(max_size=200), valid, mutated(valid))


# --- the router's gRPC door -------------------------------------------------------------------
class _Details(NamedTuple):
    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


def _lenient(method: str) -> Callable[[bytes], Any]:
    """The request deserializer `_DecodeCheck` puts in front of the Generation `method`."""
    descriptor = SERVICE.methods_by_name[method]
    parse = message_factory.GetMessageClass(descriptor.input_type).FromString
    make = (
        grpc.unary_stream_rpc_method_handler
        if descriptor.server_streaming
        else grpc.unary_unary_rpc_method_handler
    )

    async def continuation(_: Any) -> Any:
        return make(lambda request, context: None, request_deserializer=parse)

    check = _DecodeCheck(RouterMetrics("fuzz", registry=CollectorRegistry()))
    details = _Details(f"/{SERVICE.full_name}/{method}")
    handler = asyncio.run(check.intercept_service(continuation, details))  # type: ignore[arg-type]
    return handler.request_deserializer  # type: ignore[no-any-return]


LIMITS = ModelLimits(max_model_len=512, vocab_size=ByteTokenizer().vocab_size)


def _check_request_bytes(method: str, parse: Callable[[bytes], Any], data: bytes) -> None:
    result = parse(data)
    input_type = SERVICE.methods_by_name[method].input_type
    if isinstance(result, _Undecodable):
        field = bad_utf8_field(result.message, result.data)
        assert field is None or field.split(".")[0] in input_type.fields_by_name
        return
    assert result.DESCRIPTOR is input_type
    if method == "Generate":
        try:
            validate(result, ByteTokenizer(), LIMITS, DEFAULT_SLO_CLASSES)
        except RequestError as exc:
            assert exc.field, exc


@pytest.mark.parametrize("method", [m.name for m in SERVICE.methods])
def test_generation_requests_decode_or_are_refused(method: str) -> None:
    parse = _lenient(method)

    @FUZZ
    @given(data=wire(SERVICE.methods_by_name[method].input_type))
    def check(data: bytes) -> None:
        _check_request_bytes(method, parse, data)

    check()


def test_bad_utf8_is_named_inside_mutated_requests() -> None:
    parse = _lenient("Generate")
    msg = pb.GenerateRequest(text="ok @@", sampling=pb.SamplingParams(stop=["@@"]))
    data = msg.SerializeToString().replace(b"@@", b"\xff\xfe")
    result = parse(data)
    assert isinstance(result, _Undecodable)
    assert bad_utf8_field(result.message, result.data) == "text"


@FUZZ
@given(data=st.binary(max_size=64))
def test_bad_utf8_field_never_raises_on_any_descriptor(data: bytes) -> None:
    for descriptor in [*pb.DESCRIPTOR.message_types_by_name.values()]:
        field = bad_utf8_field(descriptor, data)
        assert field is None or isinstance(field, str)


# --- kvtransfer: handles, stream chunks, NVMe block files -------------------------------------
LAYOUT = KVLayout(
    tp_size=1, num_kv_heads=2, head_dim=4, num_layers=2, block_size=4, dtype="float16"
)
HANDLE = KVHandle(
    transfer_id="t-1",
    source_worker_id="p0",
    source_addresses=("127.0.0.1:1",),
    layout=LAYOUT,
    block_ids=(3, 4, 5),
    block_hashes=(b"\x01" * BLOCK_HASH_BYTES, b"\x02" * BLOCK_HASH_BYTES),
    num_tokens=10,
    model_salt="m",
)


def _versioned(msg: Message) -> bytes:
    """A random handle message that passes the version check, to reach the field checks."""
    msg.spec_version = BLOCK_HASH_SPEC_VERSION  # type: ignore[attr-defined]
    return msg.SerializeToString()


HANDLE_BYTES = st.one_of(
    wire(kb.KVHandleProto.DESCRIPTOR),
    messages(kb.KVHandleProto.DESCRIPTOR).map(_versioned),
    mutated(st.just(HANDLE.to_bytes())),
)


@FUZZ
@given(data=HANDLE_BYTES)
def test_kv_handle_decodes_or_raises_its_typed_error(data: bytes) -> None:
    try:
        handle = KVHandle.from_bytes(data)
    except HandleDecodeError:
        return
    assert KVHandle.from_bytes(handle.to_bytes()) == handle


@pytest.fixture(scope="module")
def receiver() -> Any:
    view = KVCacheView(torch.zeros(2, 2, 8, 4, 2, 4, dtype=torch.float16))
    grpc_receiver = GrpcReceiver(view, on_release=lambda transfer_id, block_ids: None)
    yield grpc_receiver
    grpc_receiver.close()


def _chunk(args: tuple[int, int, int]) -> bytes:
    first, num_blocks, seed = args
    blocks = torch.randn(num_blocks, 2, 2, 4, 2, 4, generator=torch.Generator().manual_seed(seed))
    data, crcs = block_bytes(blocks.to(torch.float16))
    chunk = kb.BlockChunk(first_block=first, num_blocks=num_blocks, block_crc32=crcs, data=data)
    return chunk.SerializeToString()


VALID_CHUNKS = st.tuples(st.integers(0, 3), st.integers(1, 3), st.integers(0, 99)).map(_chunk)
CHUNK_BYTES = st.one_of(wire(kb.BlockChunk.DESCRIPTOR), VALID_CHUNKS, mutated(VALID_CHUNKS))


@FUZZ
@given(data=CHUNK_BYTES, expected=st.integers(0, 3))
def test_kv_stream_chunks_land_or_abort_the_transfer(
    receiver: GrpcReceiver, data: bytes, expected: int
) -> None:
    try:
        msg = kb.BlockChunk.FromString(data)
    except Exception as exc:  # gRPC fails the stream on bytes that are not a BlockChunk
        assert type(exc).__name__ == "DecodeError"
        return
    part = HeadSlice(0, 0, 2, 0, 2)
    job = Transfer(HANDLE, [1, 2, 3], [part], math.inf, receiver.view)
    try:
        blocks = receiver._decode(job, part, msg, expected)
    except TransferAbortedError:
        return
    assert blocks.shape == (msg.num_blocks, 2, 2, 4, 2, 4)
    assert expected + msg.num_blocks <= HANDLE.num_blocks


MUTATION = st.tuples(
    st.sampled_from(["flip", "truncate", "splice", "extend"]),
    st.integers(0, 2**16),
    st.binary(min_size=1, max_size=12),
)


@FUZZ
@given(mutation=MUTATION, junk=st.none() | st.binary(max_size=120))
def test_nvme_block_files_read_back_whole_or_miss(
    tmp_path_factory: pytest.TempPathFactory, mutation: tuple[str, int, bytes], junk: bytes | None
) -> None:
    tier = NvmeTier(tmp_path_factory.mktemp("nvme"), bytes_per_block=64, budget_bytes=1 << 16)
    key, payload = b"k" * 16, bytes(range(64))
    tier.write(key, payload)
    path = tier._path(key)
    path.write_bytes(junk if junk is not None else _mutate((path.read_bytes(), *mutation)))
    assert tier.read(key) in (None, payload)


# --- the step channel (leader -> followers) -----------------------------------------------------
def _step(t: int, b: int, w: int) -> StepInputs:
    ids = torch.arange(t, dtype=torch.int64)
    return StepInputs(
        input_ids=ids,
        positions=ids,
        slot_mapping=ids,
        query_start_loc=torch.arange(b + 1, dtype=torch.int32),
        seq_lens=torch.ones(b, dtype=torch.int32),
        block_tables=torch.ones(b, w, dtype=torch.int32),
        sample_indices=torch.arange(min(t, b), dtype=torch.int64),
        decode_only=False,
    )


def _valid_step_message(args: tuple[int, int, int, int]) -> tuple[list[int], list[int]]:
    kind, t, b, w = args
    if kind == MessageKind.SHUTDOWN:
        return [int(MessageKind.SHUTDOWN)] + [0] * (HEADER_LEN - 1), []
    if kind in (MessageKind.KV_READ, MessageKind.KV_WRITE):
        op = KVOp(kind == MessageKind.KV_WRITE, tuple(range(1, t + 2)), (0, b + 1), (0, w + 1))
        header, payload = pack_kv(op, 7)
    else:
        header, payload = pack(_step(t, b, w), 7)
        header[0] = kind  # STEP_DIFF: the payload read as a diff
    return header.tolist(), payload.tolist()


WORD = st.one_of(st.integers(-2, 40), st.integers(-(2**63), 2**63 - 1))


def _mutate_words(args: tuple[tuple[list[int], list[int]], int, int, int]) -> Any:
    (header, payload), where, at, value = args
    words = [header, payload][where % 2]
    if words and where < 2:
        words[at % len(words)] = value
    elif where == 2:
        del payload[at % (len(payload) + 1) :]
    else:
        payload.append(value)
    return header, payload


VALID_STEPS = st.tuples(
    st.sampled_from(list(MessageKind)), st.integers(0, 6), st.integers(0, 4), st.integers(0, 3)
).map(_valid_step_message)
STEP_WORDS = st.one_of(
    st.tuples(st.lists(WORD, max_size=10), st.lists(WORD, max_size=40)),
    VALID_STEPS,
    st.tuples(VALID_STEPS, st.integers(0, 3), st.integers(0, 99), WORD).map(_mutate_words),
)


@FUZZ
@given(message=STEP_WORDS, last=st.none() | st.lists(WORD, max_size=40))
def test_step_messages_decode_or_raise_step_message_error(
    message: tuple[list[int], list[int]], last: list[int] | None
) -> None:
    header, words = message
    payload = torch.tensor(words, dtype=torch.int64)
    previous = None if last is None else torch.tensor(last, dtype=torch.int64)
    try:
        decoded, kept = decode(header, payload, previous)
    except StepMessageError as exc:
        assert exc.field
        return
    assert decoded.kind is MessageKind(header[0]) or header[0] == MessageKind.STEP_DIFF
    assert (decoded.inputs is None) == (kept is previous)


@pytest.mark.parametrize(
    ("header", "words", "field"),
    [
        ([1, 2, 1, 1, 1, 0, 0, 9], [0] * 8, "payload"),  # a split past the end (was RuntimeError)
        ([1, -1, 1, 1, 1, 0, 0, 0], [], "num_tokens"),
        ([9, 0, 0, 0, 0, 0, 0, 0], [], "kind"),  # was a bare ValueError from the enum
        ([5, 0, 0, 0, 0, 0, 0, 2], [99, 1], "payload"),  # a diff position outside (IndexError)
        ([3, 2, 0, 1, 0, 1, 0, 2], [1], "num_blocks"),
        ([1, 0, 0], [], "header"),
    ],
)
def test_step_channel_regressions_name_the_field(
    header: list[int], words: list[int], field: str
) -> None:
    with pytest.raises(StepMessageError) as caught:
        decode(header, torch.tensor(words, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))
    assert caught.value.field == field


# --- the HTTP door's bodies ---------------------------------------------------------------------
LEAF = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
VALUE = LEAF | st.lists(LEAF, max_size=3) | st.dictionaries(st.text(max_size=6), LEAF, max_size=3)
JSON = st.recursive(
    LEAF,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
BODY_MODELS: list[type[BaseModel]] = [
    schemas.CompletionRequest,
    schemas.ChatCompletionRequest,
    schemas.TokenizeRequest,
    schemas.DetokenizeRequest,
]


def near_valid(model: type[BaseModel]) -> st.SearchStrategy[dict[str, Any]]:
    """Bodies with the model's own field names (aliases too), each a random JSON value."""
    names = [f.alias or name for name, f in model.model_fields.items()]
    message = st.fixed_dictionaries({"role": VALUE, "content": VALUE})
    base = {"model": st.just("fake"), "messages": st.lists(message, max_size=3)}
    optional = {name: VALUE for name in names if name not in base}
    return st.fixed_dictionaries(base, optional=optional)


@pytest.mark.parametrize("model", BODY_MODELS, ids=lambda m: m.__name__)
def test_http_bodies_validate_or_raise_validation_error(model: type[BaseModel]) -> None:
    @FUZZ
    @given(body=st.one_of(JSON, near_valid(model)), raw=st.binary(max_size=60))
    def check(body: Any, raw: bytes) -> None:
        for parse in (lambda: model.model_validate(body), lambda: model.model_validate_json(raw)):
            try:
                parse()
            except ValidationError:
                pass

    check()
