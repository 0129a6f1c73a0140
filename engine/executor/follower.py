"""A follower rank of a TP group: one Ray actor that mirrors the leader's steps on its shard.

    start()     join the process group, build this rank's ModelRunner (loads only its slices,
                agrees on the KV block count with every rank); returns the block count
    run_loop()  until SHUTDOWN: receive a message from rank 0. STEP: runner.forward ->
                runner.compute_logits (the LM head's all-gather is a collective every rank
                joins); the logits are dropped (rank 0 samples). KV_READ / KV_WRITE: send
                rank 0 this rank's heads of the blocks, or store the heads it sends
                (engine.executor.kv_ops). Returns the steps run

Hazards: `run_loop` blocks for the actor's life, so no other call reaches the actor meanwhile
(Ray is used only to start, stop and watch it). A follower never times out while the leader is
idle; if the leader's process dies, Ray's fate-sharing kills the actors it created.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.config import EngineConfig, ModelConfig
from engine.distributed.fast_allreduce import ReductionSpec
from engine.distributed.parallel_state import TPGroup
from engine.distributed.process_group import destroy_tp_group, init_tp_group
from engine.executor.kv_ops import follower_serve
from engine.executor.ray_launch import follower_cuda_device
from engine.executor.step_channel import MessageKind, StepChannel

if TYPE_CHECKING:
    from engine.runner.model_runner import ModelRunner


@dataclass(frozen=True)
class FollowerSpec:
    """Everything a follower needs to build the same engine shard the leader expects."""

    config: EngineConfig
    model_config: ModelConfig
    model_path: str
    max_model_len: int
    rank: int
    size: int
    store_port: int
    collective_timeout_s: float
    control_timeout_s: float


class TPFollower:
    def __init__(self, spec: FollowerSpec) -> None:
        self.spec = spec
        self.runner: ModelRunner | None = None
        self.channel: StepChannel | None = None
        self.tp = TPGroup()

    def gpu_ids(self) -> list[int]:
        """Physical GPU ids Ray gave this actor (empty on CPU)."""
        import ray

        return [int(i) for i in ray.get_gpu_ids()]

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this rank runs on (placement checks)."""
        import ray

        return str(ray.get_runtime_context().get_node_id())

    def _device(self) -> torch.device:
        if self.spec.config.resolved_device().type == "cuda":
            device = follower_cuda_device(self.gpu_ids())  # every GPU visible: pick Ray's
            torch.cuda.set_device(device)
            return device
        return torch.device("cpu")

    def start(self) -> int:
        from engine.runner.model_runner import ModelRunner

        s, device = self.spec, self._device()
        tp = self.tp = init_tp_group(
            s.rank,
            s.size,
            s.store_port,
            device,
            s.collective_timeout_s,
            s.control_timeout_s,
            reduction=ReductionSpec.from_configs(s.config, s.model_config),
        )
        torch.manual_seed(s.config.seed)
        runner = self.runner = ModelRunner(
            s.config, s.model_config, s.model_path, s.max_model_len, device, show_progress=False
        )
        self.channel = StepChannel(tp, s.collective_timeout_s)
        return runner.num_blocks

    def run_loop(self) -> int:
        assert self.runner is not None and self.channel is not None, "start() first"
        steps = 0
        try:
            while True:
                message = self.channel.receive()
                if message.kind is MessageKind.SHUTDOWN:
                    return steps
                if message.kv is not None:
                    follower_serve(
                        self.tp,
                        self.runner.kv_cache,
                        message.kv,
                        self.spec.model_config.num_kv_heads,
                    )
                    continue
                assert message.inputs is not None
                self.runner.compute_logits(self.runner.forward(message.inputs))
                steps += 1
        finally:
            self.channel.close()
            destroy_tp_group()
