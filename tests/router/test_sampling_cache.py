"""Sampling settings from the wire are built once per distinct message
(router.validation.sampling_from_proto): the same settings, refusals every time."""

from __future__ import annotations

import pytest

from engine.errors import InvalidRequestError
from router.validation import SAMPLING_CACHE_MAX_BYTES, sampling_from_proto
from tandem.api import generation_pb2 as pb


def test_the_same_message_gives_the_same_settings_and_others_their_own() -> None:
    a = sampling_from_proto(pb.SamplingParams(max_tokens=16, temperature=0.5, stop=["x"]))
    b = sampling_from_proto(pb.SamplingParams(max_tokens=16, temperature=0.5, stop=["x"]))
    c = sampling_from_proto(pb.SamplingParams(max_tokens=17, temperature=0.5, stop=["x"]))
    assert a is b and a == b
    assert (a.max_tokens, a.temperature, a.stop) == (16, 0.5, ("x",))
    assert c.max_tokens == 17


def test_a_refused_message_is_refused_every_time() -> None:
    bad = pb.SamplingParams(temperature=-1.0)
    for _ in range(2):
        with pytest.raises(InvalidRequestError) as info:
            sampling_from_proto(bad)
        assert info.value.field == "sampling.temperature"


def test_a_large_message_is_built_without_the_cache() -> None:
    bias = {i: 1.0 for i in range(SAMPLING_CACHE_MAX_BYTES // 4)}  # > 4 bytes per entry
    msg = pb.SamplingParams(max_tokens=4, logit_bias=bias)
    assert msg.ByteSize() > SAMPLING_CACHE_MAX_BYTES
    params = sampling_from_proto(msg)
    assert params.logit_bias == tuple(sorted(bias.items()))
    assert params is not sampling_from_proto(msg)
