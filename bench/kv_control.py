"""Where a small p2p KV transfer's time goes: the control path, event by event.

    python bench/kv_control.py [--transfers 300] [--blocks 4]

One process, an in-process KV group of two gloo ranks (the same P2PLink, TorchP2PSender and
TorchP2PReceiver the workers use), tiny transfers so the data moves in microseconds. Each event
is stamped by wrapping the transports' methods; the two sides run concurrently (the receiver
posts its receives while PrepareSend travels), so the table is a timeline: the median time of
each event after start(), and the whole (receiver start() to DONE seen by poll). Writes
$OUT/kv_control.json when OUT is set.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, write_json  # noqa: E402
from kvtransfer.cache_view import KVCacheView  # noqa: E402
from kvtransfer.interfaces import KVPoll  # noqa: E402
from kvtransfer.receiver import ThreadedReceiver, Transfer  # noqa: E402
from kvtransfer.transports.torch_p2p import TorchP2PReceiver, TorchP2PSender  # noqa: E402
from tests.distributed.kv_links import in_process_links  # noqa: E402

EVENTS = [  # (name, what has happened by then), in protocol order
    ("worker", "the receiver's worker thread runs the job"),
    ("asked", "PrepareSend sent (not awaited)"),
    ("posted", "receives posted"),
    ("handler", "sender: PrepareSend handler entered"),
    ("handled", "sender: epoch and lease checked, send queued, answer returned"),
    ("gathering", "sender: the send thread starts gathering"),
    ("sent", "sender: sends posted, gathers finished"),
    ("reply", "receiver: the answer arrived"),
    ("landed", "receiver: a message landed, its scatter starts"),
    ("written", "receiver: the scatter finished"),
    ("done", "DONE seen by the caller's poll"),
]
_stamps: dict[int, dict[str, float]] = defaultdict(dict)
_current = [0]


def _stamp(name: str) -> None:
    _stamps[_current[0]].setdefault(name, time.perf_counter())


def _wrap(cls: type, method: str, before: str | None, after: str | None) -> None:
    inner: Callable[..., Any] = getattr(cls, method)

    def wrapped(self: object, *args: Any, **kwargs: Any) -> Any:
        if before:
            _stamp(before)
        try:
            return inner(self, *args, **kwargs)
        finally:
            if after:
                _stamp(after)

    setattr(cls, method, wrapped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transfers", type=int, default=300)
    parser.add_argument("--blocks", type=int, default=4)
    args = parser.parse_args()
    _wrap(ThreadedReceiver, "_run", "worker", None)
    _wrap(TorchP2PReceiver, "_ask", None, "asked")
    _wrap(TorchP2PReceiver, "_post_receives", None, "posted")
    _wrap(TorchP2PReceiver, "_answer", None, "reply")
    _wrap(TorchP2PSender, "_prepare_send", "handler", "handled")
    _wrap(TorchP2PSender, "_post_sends", "gathering", "sent")
    _wrap(Transfer, "write_layers", "landed", "written")
    links = in_process_links(2, timeout_s=20.0)
    src, dst = (
        KVCacheView(torch.randn(2, 2, 64, 16, 2, 64)),
        KVCacheView(torch.zeros(2, 2, 64, 16, 2, 64)),
    )
    sender = TorchP2PSender(
        src, links[0], worker_id="p", model_salt="m", on_release=lambda t, b: None
    )
    receiver = TorchP2PReceiver(dst, links[1], on_release=lambda t, b: None, timeout_s=10)
    ids = list(range(1, args.blocks + 1))
    for i in range(args.transfers):
        _current[0] = i
        handle = sender.register(f"t{i}", ids, [], len(ids) * 16, source_p2p_ranks=[0])
        _stamp("start")
        receiver.start(handle, [b + args.blocks for b in ids])
        while receiver.poll(handle.transfer_id) not in (KVPoll.DONE, KVPoll.FAILED):
            time.sleep(0.0001)
        _stamp("done")
        time.sleep(0.002)  # the ack leaves before the next transfer starts
        sender.poll()
    receiver.close()
    sender.close()
    for link in links:
        link.close()
    runs = [_stamps[i] for i in range(args.transfers // 10, args.transfers)]  # skip the warm-up
    figures = {
        name: statistics.median((r[name] - r["start"]) * 1e3 for r in runs) for name, _ in EVENTS
    }
    rows = [[what, f"{figures[name]:.3f}"] for name, what in EVENTS]
    print_table(
        f"p2p control path, {args.blocks}-block transfers (ms after start(), median of {len(runs)}; gloo, "
        "in-process)",
        ["event", "ms"],
        rows,
    )
    write_json(
        "kv_control", {"events_ms": figures, "total_ms": figures["done"], "blocks": args.blocks}
    )


if __name__ == "__main__":
    main()
