"""Naming the string field of a request's bytes that is not UTF-8 (router/undecodable.py)."""

from __future__ import annotations

from router.undecodable import bad_utf8_field
from tandem.api import generation_pb2 as pb

REQUEST = pb.GenerateRequest.DESCRIPTOR


def broken(msg: pb.GenerateRequest, marker: str) -> bytes:
    """`msg` serialized, the text `marker` replaced by bytes that are not UTF-8."""
    return msg.SerializeToString().replace(marker.encode(), b"\xff\xfe")


def test_names_the_field_dotted_from_the_top() -> None:
    sampling = pb.SamplingParams(max_tokens=4, stop=["ok", "@@"], temperature=0.5, seed=7)
    assert bad_utf8_field(REQUEST, broken(pb.GenerateRequest(text="@@"), "@@")) == "text"
    msg = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 300, 70000]), sampling=sampling)
    assert bad_utf8_field(REQUEST, broken(msg, "@@")) == "sampling.stop"
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="@@")])
    msg = pb.GenerateRequest(chat=chat, slo_class="interactive")
    assert bad_utf8_field(REQUEST, broken(msg, "@@")) == "chat.messages.content"


def test_none_for_good_text_and_for_bytes_that_are_not_a_message() -> None:
    good = pb.GenerateRequest(text="héllo", request_id="r", ttft_ms=5.0).SerializeToString()
    assert bad_utf8_field(REQUEST, good) is None
    assert bad_utf8_field(REQUEST, good[:-3]) is None  # cut short
    assert bad_utf8_field(REQUEST, b"\x0a\xff\xff") is None  # a length past the end
    assert bad_utf8_field(REQUEST, b"\x0f") is None  # wire type 7
