"""P2PLink: this process's membership in the KV group, a standalone torch.distributed backend
(ProcessGroupNCCL on GPUs, ProcessGroupGloo on CPU) built from its own store, never the
process's default group, and rebuilt under a new generation number (epoch) after a failure.

Life cycle (keys live in the group's store, itself a PrefixStore of one TCPStore):
  join     every member constructs a P2PLink concurrently (a collective): it counts itself in
           under `e1/join`, waits until all `world_size` members did, then builds the epoch-1
           backend over `PrefixStore("e1/pg/")` and sets up its pairs (below), all within
           `timeout_s`.
  use      transports take the current `Generation` with `acquire(deadline)` (the sender asks
           for the receiver's epoch) and hand it back with `release`; every wait on an operation
           is bounded by a deadline (`wait`).
  break    an operation that fails or times out calls `fail(gen, reason)`: the generation is
           marked broken, and the watcher sets `e{E}/broken`, which tells every other member.
  rebuild  each member's watcher thread sees `e{E}/broken` (its own or another's), hands out
           no more epoch-E operations, joins epoch E+1 and builds its backend and pairs (all
           members within `rebuild_timeout_s`). A member that does not come back leaves the
           link FAILED with a reason saying so; the transports then use gRPC.
  retire   a broken generation is torn down (communicators aborted) once no operation of this
           process uses it; uses are deadline-bounded, so that happens within one transfer
           timeout.
  close    stops the watcher and tears every generation down.

Communicators: one backend per epoch, shared by every peer of this process (never one per
transfer or per peer object). NCCL inside it makes a 2-rank communicator per pair that moves
KV; `peers` names the pairs (default: every other member, all pairs of the group), and each is
set up eagerly while the epoch is built, by a tiny exchange each way (p2p_pairs.py), so no
transfer's post ever blocks on set-up. A rebuild tears the previous epoch's down.

Hazards:
- NCCL matches sends and receives per pair in issue order: an operation whose partner never
  posts leaves the pair out of step for good, so every failure (timeout, error, a control
  message whose outcome is unknown) must break the generation; it is never reused.
- NCCL's pair set-up blocks until the peer sets up too, with no deadline of ours: it runs on a
  helper thread bounded by the build's deadline (a member that does not set its pairs up fails
  the build, and the link). A pair outside `peers` would be set up lazily at its first post,
  which blocks: `peers` must be symmetric and name every pair that moves KV.
- On CUDA a broken generation's waits return at once (they poll the work); gloo's waits
  cannot be interrupted (neither `abort()` nor a peer's failure ends them), so on CPU they end
  at their deadline.
- NCCL: `NCCL_NVLS_ENABLE=0` and `TORCH_NCCL_ASYNC_ERROR_HANDLING=2` (abort communicators,
  keep the process: the TP leader's value too) are set, unless already set, before the first
  backend exists. The backend's own timeout (`timeout_s`) must exceed every operation
  deadline, so our teardown, not NCCL's watchdog, ends a stuck operation.
- The store lives in rank 0's process: if it dies, no rebuild can complete and the link fails
  after `rebuild_timeout_s`.
"""

from __future__ import annotations

import datetime
import enum
import logging
import os
import threading
import time
from collections.abc import Callable, Collection
from typing import cast

import torch
import torch.distributed as dist

from kvtransfer.copy_stream import poll_until
from kvtransfer.errors import KVTransferError
from kvtransfer.transports.p2p_pairs import TAG, Backend, PairSetupError, pair_order, warm_up

log = logging.getLogger(__name__)


class LinkBrokenError(KVTransferError):
    """This operation's generation of the KV group failed or is being rebuilt."""


class LinkFailedError(LinkBrokenError):
    """The KV group could not be rebuilt (a member did not come back): p2p is off for good."""


class StaleEpochError(LinkBrokenError):
    """A peer asked for an older generation than this link's `current` one."""

    def __init__(self, asked: int, current: int) -> None:
        super().__init__(f"epoch {asked} is gone: the KV group is at epoch {current}")
        self.current = current


class LinkState(enum.Enum):
    READY = "ready"
    REBUILDING = "rebuilding"
    FAILED = "failed"
    CLOSED = "closed"


class Generation:
    """One epoch's backend. `users` (under the link's lock) counts operations in flight on it."""

    def __init__(self, epoch: int, backend: Backend) -> None:
        self.epoch = epoch
        self.backend = backend
        self.broken = threading.Event()
        self.users = 0

    def post_send(self, tensor: torch.Tensor, peer: int) -> dist.Work:
        return self.backend.send([_wire(tensor)], peer, TAG)

    def post_recv(self, tensor: torch.Tensor, peer: int) -> dist.Work:
        return self.backend.recv([_wire(tensor)], peer, TAG)


_BYTE_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _wire(tensor: torch.Tensor) -> torch.Tensor:
    """FP8 KV as its bytes (a view: a receive lands in the tensor): NCCL before 2.24 and gloo
    have no FP8 types, and the transport moves raw cache bytes anyway."""
    return tensor.view(torch.uint8) if tensor.dtype in _BYTE_DTYPES else tensor


def make_backend(
    kind: str, store: dist.Store, rank: int, size: int, timeout_s: float, name: str
) -> Backend:
    """A standalone gloo or NCCL backend over `store` (a collective for gloo, lazy for NCCL:
    each pair's communicator is made at its first send/recv, both sides at once: `warm_up`)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if kind == "gloo":
        return cast(
            Backend, dist.ProcessGroupGloo(store, rank, size, timeout)
        )  # the stubs lack send/recv
    if kind != "nccl":
        raise ValueError(f"backend: {kind!r} is not 'nccl' or 'gloo'")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    nccl = getattr(dist, "ProcessGroupNCCL")  # noqa: B009 - absent from CPU builds and their stubs
    options = nccl.Options()
    options.is_high_priority_stream = False
    options._timeout = timeout
    options.global_ranks_in_group = list(range(size))
    options.group_name = name  # names the group in NCCL's logs and flight recorder
    return cast(Backend, nccl(store, rank, size, options))


def teardown(backend: Backend) -> None:
    """Aborts a backend's communicators (NCCL: ends operations that never matched)."""
    for name in ("abort", "shutdown"):
        method = getattr(backend, name, None)
        if method is None:
            continue
        try:
            method()
            return
        except Exception as exc:  # noqa: BLE001 - best effort on a failure path
            log.warning("kvtransfer: %s of a KV group backend failed: %s", name, exc)


class P2PLink:
    """See the module docstring. `rank` is this process's rank in the KV group; `peers` the
    ranks it moves KV with (None: every other member); `device` the device its KV tensors are
    on (None: the current CUDA device for NCCL, the CPU for gloo)."""

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world_size: int,
        backend: str = "gloo",
        *,
        timeout_s: float = 120.0,
        rebuild_timeout_s: float = 30.0,
        watch_s: float = 0.05,
        peers: Collection[int] | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.store, self.rank, self.world_size, self.backend_name = store, rank, world_size, backend
        self.peers = pair_order(rank, world_size, peers)
        self.device = device or _default_device(backend)
        self._timeout_s, self._rebuild_timeout_s, self._watch_s = (
            timeout_s,
            rebuild_timeout_s,
            watch_s,
        )
        self._cond = threading.Condition()
        self._stopped = threading.Event()
        self._wake = threading.Event()
        self._retiring: list[Generation] = []
        self.state, self.reason = LinkState.REBUILDING, ""
        self._gen = self._build(1, timeout_s)
        self.state = LinkState.READY
        self._watcher = threading.Thread(target=self._watch, daemon=True, name=f"kv-link-{rank}")
        self._watcher.start()

    @property
    def epoch(self) -> int:
        return self._gen.epoch

    @property
    def current(self) -> Generation:
        """The newest generation (maybe broken or still rebuilding); not counted as a use."""
        return self._gen

    # --- operations -----------------------------------------------------------------------------
    def acquire(self, deadline: float, min_epoch: int = 0) -> Generation:
        """The generation new operations use (at `min_epoch` or later), counted as a user until
        `release`. Waits while a rebuild runs, up to `deadline` (time.monotonic). Raises
        LinkFailedError (for good) or LinkBrokenError (still rebuilding at `deadline`)."""
        return self._acquire(deadline, min_epoch, None)

    def acquire_epoch(self, deadline: float, epoch: int) -> Generation:
        """`acquire` of exactly `epoch` (what a peer posts on), waiting for a rebuild to reach
        it. Raises at once when it is gone: StaleEpochError (the link is past it) or
        LinkBrokenError (it broke here)."""
        return self._acquire(deadline, epoch, epoch)

    def _acquire(self, deadline: float, min_epoch: int, exact: int | None) -> Generation:
        with self._cond:
            while True:
                if self.state in (LinkState.FAILED, LinkState.CLOSED):
                    raise LinkFailedError(f"p2p link {self.state.value}: {self.reason}")
                gen = self._gen
                if exact is not None and gen.epoch > exact:
                    raise StaleEpochError(exact, gen.epoch)
                if exact == gen.epoch and gen.broken.is_set():
                    raise LinkBrokenError(f"epoch {gen.epoch} broke: {self.reason}")
                if (
                    self.state is LinkState.READY
                    and not gen.broken.is_set()
                    and gen.epoch >= min_epoch
                ):
                    gen.users += 1
                    return gen
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise LinkBrokenError(
                        f"p2p link not ready at the deadline (epoch {gen.epoch}: {self.reason})"
                    )
                self._cond.wait(min(remaining, self._watch_s))

    def release(self, gen: Generation) -> None:
        """Ends one use; the last use of a retired generation tears it down (here, at once: an
        NCCL operation that never matched keeps a kernel spinning until then)."""
        with self._cond:
            gen.users -= 1
            assert gen.users >= 0, "release() without acquire()"
            retired = gen.users == 0 and gen in self._retiring
            if retired:
                self._retiring.remove(gen)
        if retired:
            teardown(gen.backend)

    def fail(self, gen: Generation, reason: str) -> None:
        """Breaks `gen` (once): its operations stop, every member rebuilds. Never blocks: the
        watcher thread tells the other members (the store may be slow or gone)."""
        with self._cond:
            if gen.broken.is_set():
                return
            gen.broken.set()
            if gen is self._gen:
                self.reason = reason
            self._cond.notify_all()
        log.warning(
            "kvtransfer: p2p link epoch %d broken on rank %d: %s", gen.epoch, self.rank, reason
        )
        self._wake.set()

    def post_send(self, gen: Generation, tensor: torch.Tensor, peer: int) -> dist.Work:
        return self._post(gen, gen.post_send, tensor, peer)

    def post_recv(self, gen: Generation, tensor: torch.Tensor, peer: int) -> dist.Work:
        return self._post(gen, gen.post_recv, tensor, peer)

    def _post(
        self,
        gen: Generation,
        op: Callable[[torch.Tensor, int], dist.Work],
        tensor: torch.Tensor,
        peer: int,
    ) -> dist.Work:
        if gen.broken.is_set():
            raise LinkBrokenError(f"epoch {gen.epoch} broke: {self.reason}")
        try:
            return op(tensor, peer)
        except Exception as exc:  # e.g. gloo: the peer's connection is closed
            reason = f"posting to rank {peer}: {type(exc).__name__}: {exc}"
            self.fail(gen, reason)
            raise LinkBrokenError(reason) from exc

    def wait(self, gen: Generation, work: dist.Work, tensor: torch.Tensor, deadline: float) -> None:
        """Waits for `work` until `deadline`; any failure breaks `gen` and raises LinkBrokenError.
        On CUDA the calling thread's current stream is then ordered after the operation."""
        try:
            if tensor.is_cuda:  # NCCL's work.wait() only orders streams: poll the CUDA event
                if not poll_until(work.is_completed, deadline, gen.broken.is_set):
                    if gen.broken.is_set():
                        raise LinkBrokenError(f"epoch {gen.epoch} broke: {self.reason}")
                    raise TimeoutError("p2p operation timed out")
            work.wait(datetime.timedelta(seconds=max(0.001, deadline - time.monotonic())))
        except LinkBrokenError:
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self.fail(gen, reason)
            raise LinkBrokenError(reason) from exc

    def close(self) -> None:
        self._stopped.set()
        with self._cond:
            if self.state is not LinkState.FAILED:
                self.state, self.reason = LinkState.CLOSED, "closed"
            self._gen.broken.set()
            self._cond.notify_all()
        self._wake.set()
        if self._watcher.is_alive() and threading.current_thread() is not self._watcher:
            self._watcher.join(timeout=self._rebuild_timeout_s + 5)
        for gen in [*self._retiring, self._gen]:
            teardown(gen.backend)
        self._retiring.clear()

    # --- the watcher thread ---------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stopped.is_set():
            self._wake.wait(self._watch_s)
            self._wake.clear()
            self._retire_idle()
            gen = self._gen
            if self._stopped.is_set() or not (
                gen.broken.is_set() or self._published_broken(gen.epoch)
            ):
                continue
            if not self._rebuild(gen):
                return

    def _published_broken(self, epoch: int) -> bool:
        try:
            return self.store.check([_broken_key(epoch)])
        except Exception:  # noqa: BLE001 - a lost store only matters once a rebuild needs it
            return False

    def _rebuild(self, old: Generation) -> bool:
        with self._cond:
            self.state = LinkState.REBUILDING
            old.broken.set()
            self._retiring.append(old)
        self._retire_idle()
        try:
            self.store.set(_broken_key(old.epoch), self.reason)  # tells members that did not see it
        except Exception as exc:  # noqa: BLE001 - the store's host is gone: the join below fails too
            log.warning("kvtransfer: cannot publish the broken epoch %d: %s", old.epoch, exc)
        try:
            new = self._build(old.epoch + 1, self._rebuild_timeout_s)
        except LinkFailedError as exc:
            with self._cond:
                if self.state is not LinkState.CLOSED:
                    self.state, self.reason = LinkState.FAILED, str(exc)
                self._cond.notify_all()
            log.error("kvtransfer: %s", exc)
            return False
        with self._cond:
            self._gen, self.state = new, LinkState.READY
            self._cond.notify_all()
        log.info("kvtransfer: p2p link rebuilt at epoch %d on rank %d", new.epoch, self.rank)
        self._retire_idle()
        return True

    def _retire_idle(self) -> None:
        with self._cond:
            idle = [g for g in self._retiring if g.users == 0]
            self._retiring = [g for g in self._retiring if g.users > 0]
        for gen in idle:
            teardown(gen.backend)

    def _build(self, epoch: int, timeout_s: float) -> Generation:
        """Joins epoch `epoch`, builds its backend and sets up its pairs (all members, within
        `timeout_s`)."""
        key = f"e{epoch}/join"
        try:
            self.store.add(key, 1)
            deadline = time.monotonic() + timeout_s
            while (joined := self.store.add(key, 0)) < self.world_size:
                if self._stopped.is_set():
                    raise LinkFailedError("p2p link closed while rebuilding")
                if time.monotonic() >= deadline:
                    raise LinkFailedError(
                        f"KV group epoch {epoch}: {joined} of {self.world_size} members joined within "
                        f"{timeout_s:g}s (a member is gone); p2p transfers are off, gRPC still works"
                    )
                time.sleep(min(0.01, self._watch_s))
            backend = make_backend(
                self.backend_name,
                dist.PrefixStore(f"e{epoch}/pg/", self.store),
                self.rank,
                self.world_size,
                self._timeout_s,
                f"tandem-kv-e{epoch}",
            )
            warm_up(backend, self.rank, self.peers, self.device, deadline)
        except LinkFailedError:
            raise
        except Exception as exc:  # the store, the backend's rendezvous or a pair's set-up failed
            hint = (
                "; p2p transfers are off, gRPC still works"
                if isinstance(exc, PairSetupError)
                else ""
            )
            raise LinkFailedError(
                f"KV group epoch {epoch} did not form: {type(exc).__name__}: {exc}{hint}"
            ) from exc
        return Generation(epoch, backend)


def _default_device(backend: str) -> torch.device:
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broken_key(epoch: int) -> str:
    return f"e{epoch}/broken"
