"""Why a request's bytes do not parse: the string field that is not UTF-8. Protobuf only.

protobuf's parser refuses a message whose string field holds bytes that are not UTF-8, and
says only "String field had bad UTF-8". `bad_utf8_field` walks the wire format itself
(varints, fixed 32/64-bit values and length-delimited fields; messages recursively) to name
the field, dotted from the top ("chat.messages.content"), so that the caller can be told which
field to fix.
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor

_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


class _Malformed(ValueError):
    """The bytes are not the wire format at all."""


def bad_utf8_field(descriptor: Descriptor, data: bytes) -> str | None:
    """The path of the first string field in `data` (a serialized `descriptor` message) whose
    bytes are not UTF-8; None when every string is, or the bytes are not well formed."""
    try:
        return _walk(descriptor, memoryview(data))
    except _Malformed:
        return None


def _walk(descriptor: Descriptor, data: memoryview) -> str | None:
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            _, pos = _varint(data, pos)
        elif wire_type in (_FIXED64, _FIXED32):
            pos += 8 if wire_type == _FIXED64 else 4
        elif wire_type == _LENGTH_DELIMITED:
            size, pos = _varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
            if len(value) != size:
                raise _Malformed("a field runs past the end")
            bad = _check(descriptor.fields_by_number.get(number), value)
            if bad is not None:
                return bad
        else:
            raise _Malformed(f"wire type {wire_type}")
    if pos != len(data):
        raise _Malformed("a value runs past the end")
    return None


def _check(field: FieldDescriptor | None, value: memoryview) -> str | None:
    """The bad path inside one length-delimited field (unknown fields and bytes are not text)."""
    if field is None:
        return None
    if field.type == FieldDescriptor.TYPE_STRING:
        try:
            bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return field.name
        return None
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        inner = _walk(field.message_type, value)
        return None if inner is None else f"{field.name}.{inner}"
    return None


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _Malformed("a varint runs past the end")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos
