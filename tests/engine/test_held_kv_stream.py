"""Streaming a held prompt's KV while it is prefilled (`LLMEngine.stream_held_kv`): the listener
sees exactly the blocks the request will hold, once, at the step that completes the prompt; a
decode engine that starts receiving then (before the first token exists) decodes the same
tokens as a colocated run."""

from __future__ import annotations

import time

import pytest

from engine import LLM, SamplingParams
from engine.engine import HeldKVEnqueued
from kvtransfer.cache_view import KVCacheView
from kvtransfer.interfaces import KVPoll
from kvtransfer.transports.fake import FakeFabric, FakeReceiver, FakeSender

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
FIRST_ONLY = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
PROMPT = [(7 * i + 3) % 500 for i in range(70)]  # 4 full blocks and a partial one


def _llm(**kwargs: object) -> LLM:
    return LLM("preset:tiny", device="cpu", load_format="dummy", show_progress=False, **kwargs)


def _run(llm: LLM) -> None:
    while llm.engine.has_unfinished():
        llm.engine.step()


@pytest.mark.parametrize("chunk", [None, 32])
def test_listener_sees_the_held_blocks_once_at_the_last_prefill_step(chunk: int | None) -> None:
    kwargs = (
        {} if chunk is None else {"max_num_batched_tokens": chunk, "enable_chunked_prefill": True}
    )
    llm = _llm(**kwargs)
    engine = llm.engine
    seen: list[tuple[HeldKVEnqueued, int]] = []
    engine.stream_held_kv(lambda held: seen.append((held, held.request.num_computed_tokens)))
    held = engine.add_request("held", PROMPT, FIRST_ONLY, hold_kv=True)
    engine.add_request("plain", PROMPT[:40], FIRST_ONLY)
    _run(llm)
    assert len(seen) == 1, "once, for the hold_kv request only"
    event, computed_before = seen[0]
    assert event.request is held and event.block_ids == held.held_block_ids
    assert event.block_hashes == held.block_hashes[: len(PROMPT) // engine.config.block_size]
    assert (
        event.layer_ready == [None] * engine.model_config.num_layers
    )  # CPU: the layers already ran
    if chunk is not None:
        assert computed_before > 0, "called at the last chunk, not the first"
    engine.release_blocks(held.held_block_ids)
    engine.kv_manager.pool.check_integrity()


def test_no_listener_and_unset_listener_change_nothing() -> None:
    llm = _llm()
    calls: list[HeldKVEnqueued] = []
    llm.engine.stream_held_kv(calls.append)
    llm.engine.stream_held_kv(None)
    request = llm.engine.add_request("r", PROMPT, FIRST_ONLY, hold_kv=True)
    _run(llm)
    assert calls == [] and request.held_block_ids


def test_streamed_handle_before_the_first_token_decodes_like_colocated() -> None:
    prefill, decode = _llm(), _llm()
    colocated = decode.generate([PROMPT], GREEDY)[0].token_ids
    fabric, released = FakeFabric(), []
    sender = FakeSender(
        fabric,
        "p",
        KVCacheView(prefill.engine.runner.kv_cache),
        model_salt=prefill.engine.kv_manager.salt,
        on_release=lambda tid, blocks: released.append(blocks),
    )
    receiver = FakeReceiver(
        fabric,
        KVCacheView(decode.engine.runner.kv_cache),
        on_release=lambda tid, blocks: decode.engine.release_blocks(blocks),
    )
    incoming = []

    def on_enqueued(held: HeldKVEnqueued) -> None:  # the decode side starts before the first token
        handle = sender.register(
            "r", held.block_ids, held.block_hashes, len(PROMPT), layer_ready=held.layer_ready
        )
        request = decode.engine.add_prefilled("r", PROMPT, None, GREEDY)
        assert request is not None
        receiver.start(handle, request.block_ids[: handle.num_blocks])
        incoming.append(request)

    prefill.engine.stream_held_kv(on_enqueued)
    prefilled = prefill.engine.add_request("r", PROMPT, FIRST_ONLY, hold_kv=True)
    _run(prefill)
    (request,) = incoming
    with pytest.raises(ValueError, match="first token"):
        decode.engine.activate_prefilled(request)
    deadline = time.monotonic() + 10
    while receiver.poll("r") not in (KVPoll.DONE, KVPoll.FAILED) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert receiver.poll("r") is KVPoll.DONE, receiver.failure_reason("r")
    decode.engine.set_first_token(request, prefilled.output_token_ids[0])
    with pytest.raises(ValueError, match="already"):
        decode.engine.set_first_token(request, 0)
    decode.engine.activate_prefilled(request)
    _run(decode)
    assert request.output_token_ids == list(colocated)
    while not released:  # the receiver's ack ends the lease
        sender.poll()
        time.sleep(0.001)
    assert released == [prefilled.held_block_ids]
    prefill.engine.release_blocks(prefilled.held_block_ids)
    prefill.engine.kv_manager.pool.check_integrity()
    receiver.close()
    sender.close()
