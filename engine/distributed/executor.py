"""TPExecutor: rank 0's side of a tensor-parallel group of local Ray actors.

Life cycle (`TPState`):
    STARTING   launch(): Ray up, placement group, followers spawned and started (they build
               their shards while rank 0 builds its own in build_leader())
    RUNNING    every engine step goes through step(inputs): publish the StepInputs to the
               followers, then rank 0 runs forward, logits and sampling inside the scope;
               read_kv / write_kv move KV blocks of every rank (engine.distributed.kv_ops)
    FAILED     a follower died, raised or hung: the step raises TPGroupError naming the rank,
               followers are killed and every later step raises the same error
    SHUT_DOWN  shutdown(): followers get SHUTDOWN, the group is torn down (idempotent)

Failure bounds: a dead follower breaks gloo's sockets at once and resolves its watched
`run_loop` future (the watchdog aborts NCCL for graph-replayed collectives); a hung one trips
the collective timeout (`collective_timeout_s`) or the watchdog's step deadline
(`step_timeout_s`). After the leader sees an error it waits up to `diagnose_s` for Ray to
report which rank died, so the error names it. A failed KV op fails the group the same way.

Threads: the engine thread runs steps while KV transports and tier threads call read_kv /
write_kv from their own threads. Every message and collective of a step or a KV op must reach
the followers in one order, so `step()` holds `_lock` for the whole step and each KV op holds
it too (an RLock: a preemption swap on the engine thread may move KV between steps or, in
principle, inside one).
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from engine.config import EngineConfig, ModelConfig
from engine.distributed import kv_ops, ray_launch
from engine.distributed.errors import TPGroupError
from engine.distributed.follower import FollowerSpec
from engine.distributed.kv_ops import KVOp
from engine.distributed.process_group import destroy_tp_group, host_store, init_tp_group
from engine.distributed.step_channel import StepChannel
from engine.distributed.watchdog import Failure, FollowerWatchdog
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
    def __init__(self, size: int, device: torch.device, followers: list[Any], pg: Any,
                 options: TPOptions, watchdog: FollowerWatchdog, num_kv_heads: int) -> None:
        self.size = size
        self.device = device
        self.followers = followers  # followers[i] is rank i + 1
        self.follower_pids: list[int] = []
        self.follower_node_ids: list[str] = []
        self.options = options
        self.state = TPState.STARTING
        self.num_steps = 0
        self.num_kv_ops = 0
        self.num_kv_heads = num_kv_heads  # over the whole group
        self._pg = pg  # None when the placement group is not ours to remove
        self._lock = threading.RLock()
        self._depth = 0  # nesting of step / KV op scopes under `_lock`
        self._watchdog = watchdog
        self._channel: StepChannel | None = None
        self._start_futures: dict[int, Any] = {}
        self._run_futures: dict[int, Any] = {}
        self._error: TPGroupError | None = None
        atexit.register(self.shutdown)

    # ---------------------------------------------------------------- start-up

    @classmethod
    def launch(cls, config: EngineConfig, model_config: ModelConfig, model_path: str, max_model_len: int,
               options: TPOptions | None = None) -> TPExecutor:
        """Start followers and join the group as rank 0; the caller then calls build_leader()."""
        opts = options or TPOptions()
        size, use_gpu = config.tensor_parallel_size, config.resolved_device().type == "cuda"
        ray_launch.ensure_ray()
        place = ray_launch.group_placement(size, use_gpu, opts.startup_timeout_s, opts.use_current_placement_group)
        store = host_store(size, RENDEZVOUS_TIMEOUT_S)
        specs = [FollowerSpec(config, model_config, model_path, max_model_len, rank, size, store.port,
                              opts.collective_timeout_s, opts.startup_timeout_s) for rank in range(1, size)]
        followers = [ray_launch.spawn_follower(place.pg, s.rank, place.bundles[s.rank], s) for s in specs]
        executor = cls(size, torch.device("cpu"), followers, place.pg if place.owned else None, opts,
                       FollowerWatchdog(opts.step_timeout_s), model_config.num_kv_heads)
        with executor._failing_as_group():
            executor.device = executor._leader_device(use_gpu)
            starts = {rank: f.start.remote() for rank, f in enumerate(followers, start=1)}
            executor._watchdog.watch(starts, may_return=True)
            executor._start_futures = starts
            init_tp_group(0, size, store.port, executor.device, opts.collective_timeout_s,
                          opts.startup_timeout_s, store=store)
        return executor

    def _leader_device(self, use_gpu: bool) -> torch.device:
        import ray

        timeout = self.options.startup_timeout_s
        ids = ray.get([f.gpu_ids.remote() for f in self.followers], timeout=timeout)
        self.follower_pids = ray.get([f.pid.remote() for f in self.followers], timeout=timeout)
        self.follower_node_ids = ray.get([f.node_id.remote() for f in self.followers], timeout=timeout)
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
            blocks = ray.get(list(self._start_futures.values()), timeout=self.options.startup_timeout_s)
            num_blocks = getattr(runner, "num_blocks", None)
            assert all(b == num_blocks for b in blocks), f"KV block counts differ across ranks: {blocks}"
            self._channel = StepChannel(_current_group(), self.options.collective_timeout_s)
            self._run_futures = {rank: f.run_loop.remote() for rank, f in enumerate(self.followers, start=1)}
            self._watchdog.watch(self._run_futures, may_return=False)
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
            out = kv_ops.leader_read(_current_group(), cache, op, self.num_kv_heads,
                                     self.options.collective_timeout_s)
            self.num_kv_ops += 1
        return out

    def write_kv(self, cache: torch.Tensor, op: KVOp, data: torch.Tensor) -> None:
        """Stores `data` [l, 2, n, bs, h, D] (on rank 0's device) on every rank holding its heads."""
        assert op.write and op.block_ids
        with self._in_flight("KV write") as channel:
            channel.publish_kv(op, self.num_kv_ops)
            kv_ops.leader_write(_current_group(), cache, op, data, self.num_kv_heads,
                                self.options.collective_timeout_s)
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
        except TPGroupError:
            raise
        except Exception as err:
            raise self._fail(err) from err

    def _fail(self, cause: BaseException) -> TPGroupError:
        if self._error is None:
            failure = self._watchdog.failure or self._watchdog.check(self.options.diagnose_s)
            if failure is None:
                ranks = list(range(1, self.size))
                failure = Failure(ranks[0] if len(ranks) == 1 else None,
                                  f"did not respond (hung or unreachable); followers {ranks}")
            self._error = TPGroupError(failure.rank, f"{failure.message} [rank 0 saw: {_first_line(cause)}]")
            self.state = TPState.FAILED
            self._teardown()
        return self._error

    # ---------------------------------------------------------------- shutdown

    def shutdown(self) -> None:
        """Stop the followers and leave the group; safe to call in any state, twice."""
        import ray

        with self._lock:
            if self.state is TPState.RUNNING and self._channel is not None:
                self._watchdog.watch({}, may_return=True)
                with contextlib.suppress(Exception):
                    self._channel.publish_shutdown()
                    ray.get(list(self._run_futures.values()), timeout=self.options.collective_timeout_s)
            if self.state is not TPState.FAILED:
                self.state = TPState.SHUT_DOWN
            self._teardown()

    def _teardown(self) -> None:
        self._watchdog.stop()
        ray_launch.kill_actors(self.followers, self._pg)
        self._pg = None
        destroy_tp_group()
        atexit.unregister(self.shutdown)


def _current_group() -> Any:
    from engine.distributed.parallel_state import get_tp_group

    return get_tp_group()


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return (lines[0][:300] if lines else "") or type(err).__name__
