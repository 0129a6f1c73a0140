"""In-process fake transport: copies blocks straight between KVCacheViews (tests, colocated).

A `FakeFabric` stands for the network: senders register under a name, receivers look them up
by the handle's address. `kill(address)` simulates a sender process dying: its streams break
at the next chunk and it stops answering notices (its leases are released when the test
closes it, as a dead process frees its memory).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from kvtransfer.cache_view import KVCacheView
from kvtransfer.errors import TransferAbortedError
from kvtransfer.handle import KVHandle
from kvtransfer.interfaces import ReleaseCallback
from kvtransfer.receiver import ThreadedReceiver, Transfer
from kvtransfer.reshard import HeadSlice
from kvtransfer.sender import DEFAULT_CHUNK_BYTES, LeasedSender


class FakeFabric:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._senders: dict[str, FakeSender] = {}
        self._dead: set[str] = set()

    def attach(self, sender: FakeSender) -> None:
        with self._lock:
            self._senders[sender.address] = sender

    def lookup(self, address: str) -> FakeSender:
        with self._lock:
            if address in self._dead or address not in self._senders:
                raise ConnectionError(f"no live sender at {address}")
            return self._senders[address]

    def kill(self, address: str) -> None:
        with self._lock:
            self._dead.add(address)

    def is_dead(self, address: str) -> bool:
        with self._lock:
            return address in self._dead


class FakeSender(LeasedSender):
    def __init__(
        self,
        fabric: FakeFabric,
        name: str,
        view: KVCacheView,
        *,
        model_salt: str,
        on_release: ReleaseCallback,
        lease_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            view,
            worker_id=name,
            model_salt=model_salt,
            on_release=on_release,
            lease_s=lease_s,
            clock=clock,
        )
        self.fabric = fabric
        self._address = f"fake://{name}"
        fabric.attach(self)

    @property
    def address(self) -> str:
        return self._address


class FakeReceiver(ThreadedReceiver):
    def __init__(
        self,
        fabric: FakeFabric,
        view: KVCacheView,
        *,
        on_release: ReleaseCallback,
        timeout_s: float = 30.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(view, on_release=on_release, timeout_s=timeout_s, clock=clock)
        self.fabric = fabric
        self._chunk_bytes = chunk_bytes

    def _fetch_slice(self, job: Transfer, part: HeadSlice) -> None:
        address = job.handle.source_addresses[part.source_rank]
        sender = self.fabric.lookup(address)
        for first, chunk in sender.serve_chunks(
            job.transfer_id, (part.src_start, part.src_end), self._chunk_bytes
        ):
            if self.fabric.is_dead(address):
                raise TransferAbortedError(f"sender {address} died mid-stream")
            job.write(first, chunk, part)

    def _notify(self, handle: KVHandle, source_rank: int, ok: bool, reason: str) -> None:
        try:
            sender = self.fabric.lookup(handle.source_addresses[source_rank])
        except ConnectionError:
            return
        sender.ack(handle.transfer_id, ok, reason)
