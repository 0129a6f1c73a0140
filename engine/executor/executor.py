"""TPExecutor: rank 0's side of a tensor-parallel group of local Ray actors.

Life cycle (`TPState`):
    STARTING   launch(): Ray up, placement group, followers spawned and started (they build
               their shards while rank 0 builds its own in build_leader())
    RUNNING    every engine step goes through step(inputs): publish the StepInputs to the
               followers, then rank 0 runs forward, logits and sampling inside the scope;
               read_kv / write_kv move KV blocks of every rank (engine.executor.kv_ops)
    FAILED     a follower died, raised or hung: the step raises TPGroupError naming the rank,
               followers are killed and every later step raises the same error
    SHUT_DOWN  shutdown(): followers get SHUTDOWN, the group is torn down (idempotent); an
               executor garbage-collected unclosed releases the same (a finalizer)

Everything the group holds beyond this object (actors, placement group, watchdog thread, step
channel, process groups) lives in its GroupResources (engine.executor.group_resources),
released once by whichever of shutdown, failure or the finalizer comes first.

Failure bounds: a dead follower breaks gloo's sockets at once and resolves its watched
`run_loop` future (the watchdog aborts NCCL for graph-replayed collectives); a hung one trips
the collective timeout (`collective_timeout_s`) or the watchdog's step deadline
(`step_timeout_s`). After the leader sees an error it waits up to `diagnose_s` for Ray to
report which rank died, so the error names it; when no follower failed and rank 0's error was
not a wait on them, the error names rank 0. A failed KV op fails the group the same way.

Threads: the engine thread runs steps while KV transports and tier threads call read_kv /
write_kv from their own threads. Every message and collective of a step or a KV op must reach
the followers in one order, so `step()` holds `_lock` for the whole step and each KV op holds
it too (an RLock: a preemption swap on the engine thread may move KV between steps or, in
principle, inside one).
"""

from __future__ import annotations

import contextlib
import enum
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from engine.config import EngineConfig, ModelConfig
from engine.distributed.errors import TPGroupError
from engine.distributed.fast_allreduce import ReductionSpec
from engine.distributed.process_group import (
    claim_default_group,
    host_store,
    init_tp_group,
)
from engine.executor import kv_ops, ray_launch
from engine.executor.follower import FollowerSpec
from engine.executor.group_resources import GroupResources
from engine.executor.kv_ops import KVOp
from engine.executor.shm_channel import ChannelAborted
from engine.executor.step_channel import StepChannel
from engine.executor.watchdog import Failure, FollowerWatchdog
from engine.runner.inputs import StepInputs

R = TypeVar("R")
RENDEZVOUS_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class TPOptions:
    collective_timeout_s: float = 15.0  # a model collective (and a step publish) waits this long
    step_timeout_s: float = 60.0  # a whole step in flight (catches NCCL inside CUDA graphs)
    startup_timeout_s: float = 600.0  # actors up, placement, loading skew between ranks
    diagnose_s: float = 5.0  # after an error, how long Ray gets to report which rank died
    # Rank 0 is a Ray actor that a launcher placed in bundle 0 of a group reserved for every
    # rank: followers take its bundles 1.. (a new group when there is none).
    use_current_placement_group: bool = False


class TPState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    FAILED = "failed"
    SHUT_DOWN = "shut_down"


class TPExecutor:
    def __init__(
        self, size: int, device: torch.device, pg: Any, options: TPOptions, num_kv_heads: int
    ) -> None:
        """`pg`: the placement group to remove at teardown (None: not this group's own)."""
        self.size = size
        self.device = device
        self.options = options
        self.state = TPState.STARTING
        self.num_steps = 0
        self.num_kv_ops = 0
        self.num_kv_heads = num_kv_heads  # over the whole group
        self._lock = threading.RLock()
        self._depth = 0  # nesting of step / KV op scopes under `_lock`
        self._watchdog = FollowerWatchdog(options.step_timeout_s)
        self._resources = GroupResources(pg, self._watchdog, options.collective_timeout_s)
        self._finalizer = weakref.finalize(self, self._resources.release, True)
        self._start_futures: dict[int, Any] = {}
        self._error: TPGroupError | None = None

    @property
    def followers(self) -> list[Any]:
        """The follower actors; followers[i] is rank i + 1."""
        return self._resources.followers

    @property
    def follower_pids(self) -> list[int]:
        return self._resources.follower_pids

    @property
    def follower_node_ids(self) -> list[str]:
        return self._resources.follower_node_ids

    @property
    def _channel(self) -> StepChannel | None:
        return self._resources.channel

    # ---------------------------------------------------------------- start-up

    @classmethod
    def launch(
        cls,
        config: EngineConfig,
        model_config: ModelConfig,
        model_path: str,
        max_model_len: int,
        options: TPOptions | None = None,
    ) -> TPExecutor:
        """Start followers and join the group as rank 0; the caller then calls build_leader()."""
        opts = options or TPOptions()
        size, use_gpu = config.tensor_parallel_size, config.resolved_device().type == "cuda"
        claim_default_group(0)  # an earlier group still open here fails now, before any follower
        ray_launch.ensure_ray()
        place = ray_launch.group_placement(
            size, use_gpu, opts.startup_timeout_s, opts.use_current_placement_group
        )
        executor = cls(
            size,
            torch.device("cpu"),
            place.pg if place.owned else None,
            opts,
            model_config.num_kv_heads,
        )
        with executor._failing_as_group():
            store = host_store(size, RENDEZVOUS_TIMEOUT_S)
            specs = [
                FollowerSpec(
                    config,
                    model_config,
                    model_path,
                    max_model_len,
                    rank,
                    size,
                    store.port,
                    opts.collective_timeout_s,
                    opts.startup_timeout_s,
                )
                for rank in range(1, size)
            ]
            executor.followers.extend(
                ray_launch.spawn_follower(place.pg, s.rank, place.bundles[s.rank], s) for s in specs
            )
            executor.device = executor._leader_device(use_gpu)
            starts = {rank: f.start.remote() for rank, f in enumerate(executor.followers, start=1)}
            executor._watchdog.watch(starts, may_return=True)
            executor._start_futures = starts
            init_tp_group(
                0,
                size,
                store.port,
                executor.device,
                opts.collective_timeout_s,
                opts.startup_timeout_s,
                store=store,
                reduction=ReductionSpec.from_configs(config, model_config),
            )
        return executor

    def _leader_device(self, use_gpu: bool) -> torch.device:
        import ray

        timeout, res = self.options.startup_timeout_s, self._resources
        ids = ray.get([f.gpu_ids.remote() for f in self.followers], timeout=timeout)
        res.follower_pids[:] = ray.get([f.pid.remote() for f in self.followers], timeout=timeout)
        res.follower_node_ids[:] = ray.get(
            [f.node_id.remote() for f in self.followers], timeout=timeout
        )
        if not use_gpu:
            return torch.device("cpu")
        device = ray_launch.leader_cuda_device([i for gpu in ids for i in gpu])
        torch.cuda.set_device(device)
        return device

    def build_leader(self, make_runner: Callable[[], R]) -> R:
        """Build rank 0's runner (its collectives meet the followers'), then start their loops."""
        import ray

        with self._failing_as_group():
            runner = make_runner()
            blocks = ray.get(
                list(self._start_futures.values()), timeout=self.options.startup_timeout_s
            )
            num_blocks = getattr(runner, "num_blocks", None)
            assert all(b == num_blocks for b in blocks), (
                f"KV block counts differ across ranks: {blocks}"
            )
            res = self._resources
            res.channel = StepChannel(_current_group(), self.options.collective_timeout_s)
            res.run_futures = {
                rank: f.run_loop.remote() for rank, f in enumerate(self.followers, start=1)
            }
            self._watchdog.watch(res.run_futures, may_return=False)
        self.state = TPState.RUNNING
        return runner

    # ---------------------------------------------------------------- steps

    @contextlib.contextmanager
    def step(self, inputs: StepInputs) -> Iterator[None]:
        """Publish `inputs` to every follower; the body runs rank 0's share of the step.

        Raises TPGroupError (naming the rank when known) if any rank failed before or during
        the step, including failures the watchdog saw while the body ran. Holds the group's
        lock throughout: KV ops from other threads wait for the step to end."""
        with self._in_flight("step") as channel:
            channel.publish(inputs, self.num_steps)
            yield
        self.num_steps += 1

    # ---------------------------------------------------------------- KV ops

    def read_kv(self, cache: torch.Tensor, op: KVOp) -> torch.Tensor:
        """Blocks of every rank (`op.heads` global heads, `op.layers`) as one tensor on rank 0's
        device, from rank 0's `cache` and the followers'. Any thread; raises TPGroupError (the
        group is failed) if a rank fails. `op` must be valid: the followers do not check it."""
        assert not op.write and op.block_ids
        with self._in_flight("KV read") as channel:
            channel.publish_kv(op, self.num_kv_ops)
            out = kv_ops.leader_read(
                _current_group(), cache, op, self.num_kv_heads, self.options.collective_timeout_s
            )
            self.num_kv_ops += 1
        return out

    def write_kv(self, cache: torch.Tensor, op: KVOp, data: torch.Tensor) -> None:
        """Stores `data` [l, 2, n, bs, h, D] (on rank 0's device) on every rank holding its heads."""
        assert op.write and op.block_ids
        with self._in_flight("KV write") as channel:
            channel.publish_kv(op, self.num_kv_ops)
            kv_ops.leader_write(
                _current_group(),
                cache,
                op,
                data,
                self.num_kv_heads,
                self.options.collective_timeout_s,
            )
            self.num_kv_ops += 1

    @contextlib.contextmanager
    def _in_flight(self, what: str) -> Iterator[StepChannel]:
        """Holds the lock, refuses a group that is not RUNNING, times the outermost scope with
        the watchdog and turns any failure into the group's TPGroupError, including one the
        watchdog saw before or while the body ran (aborted NCCL lets a body finish)."""
        with self._lock:
            if self.state is not TPState.RUNNING:
                raise self._error or TPGroupError(None, f"is {self.state.value}; no {what} can run")
            assert self._channel is not None
            self._depth += 1
            if self._depth == 1:
                self._watchdog.step_started()
            try:
                with self._failing_as_group():
                    self._check_watchdog(what)
                    yield self._channel
                    self._check_watchdog(what)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._watchdog.step_finished()

    def _check_watchdog(self, what: str) -> None:
        if self._watchdog.failure is not None:
            raise RuntimeError(f"the watchdog saw a follower fail around this {what}")

    @contextlib.contextmanager
    def _failing_as_group(self) -> Iterator[None]:
        try:
            yield
        except TPGroupError as err:
            self._fail_with(err)
            raise
        except Exception as err:
            failure = self._watchdog.failure or self._watchdog.check(self.options.diagnose_s)
            failure = failure or self._presumed_failure(err)
            raise self._fail_with(
                TPGroupError(failure.rank, f"{failure.message} [rank 0 saw: {_first_line(err)}]")
            ) from err

    def _presumed_failure(self, cause: BaseException) -> Failure:
        """No follower is known to have failed. If rank 0 was waiting on them (a timeout, an
        aborted channel, a lost connection) they did not respond; otherwise rank 0 failed."""
        if not _is_wait_failure(cause):
            return Failure(0, f"failed: {type(cause).__name__} (no follower reported a failure)")
        ranks = list(range(1, self.size))
        return Failure(
            ranks[0] if len(ranks) == 1 else None,
            f"did not respond (hung or unreachable); followers {ranks}",
        )

    def _fail_with(self, error: TPGroupError) -> TPGroupError:
        """The group's error from now on (the first one wins); releases its resources."""
        if self._error is None:
            self._error = error
            self.state = TPState.FAILED
            self._resources.release(graceful=False)
        return self._error

    # ---------------------------------------------------------------- shutdown

    def shutdown(self) -> None:
        """Stop the followers, wait for their processes to exit, leave the group and end the
        watchdog thread; afterwards this process can start another TP group. Safe to call in
        any state, twice; never raises."""
        with self._lock:
            if self.state is not TPState.FAILED:
                self.state = TPState.SHUT_DOWN
            self._finalizer()  # GroupResources.release(graceful=True), at most once
        self._resources.wait_stopped()  # also after a failure, whose release did not wait


def _current_group() -> Any:
    from engine.distributed.parallel_state import get_tp_group

    return get_tp_group()


def _is_wait_failure(err: BaseException) -> bool:
    """Whether rank 0's error ended a wait on its followers (timed out, aborted, connection
    lost) rather than being its own (a bad checkpoint, out of memory, a bug)."""
    import ray
    import torch.distributed as dist

    if isinstance(err, (TimeoutError, ChannelAborted, ray.exceptions.RayError, dist.DistError)):
        return True
    text = str(err).lower()
    words = ("timed out", "timeout", "did not take", "connection", "peer", "watchdog saw")
    return any(word in text for word in words)


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return (lines[0][:300] if lines else "") or type(err).__name__
