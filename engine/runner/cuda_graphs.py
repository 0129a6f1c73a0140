"""CUDA graphs for decode steps at a set of batch-size buckets.

A decode step of B requests (one token each) replays the graph of the smallest bucket >= B.
Padded rows read and write only the null block 0 (slot 0, one token of context), so they can
never touch a live request's KV. The graphs are captured over static input buffers; the
attention metadata inside them uses `max_model_len` as the context bound, so a step's real
lengths come only from the device tensor `seq_lens`.

Attention backend hooks (engine/attention/backend.py): `capture_begin(meta)` / `capture_end(meta)`
bracket each bucket's warm-up and capture, and `prepare_replay(meta)` runs before every replay
(in place of `plan`), `meta` being the bucket's static metadata with this step's host values.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from engine.attention.backend import AttentionBackend, AttentionMetadata
from engine.models.llama import ForwardContext
from engine.runner.inputs import StepInputs
from engine.utils.math import cdiv

if TYPE_CHECKING:
    from engine.runner.model_runner import ModelRunner


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, batch_sizes: tuple[int, ...]) -> None:
        self.runner = runner
        self.batch_sizes = sorted(b for b in batch_sizes if b <= runner.engine_cfg.max_num_seqs)
        if not self.batch_sizes:
            self.batch_sizes = [1]
        max_bs = self.batch_sizes[-1]
        max_blocks = cdiv(runner.max_model_len, runner.block_size)
        device = runner.device
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.slot_mapping = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_bs, max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool: Any = None  # the graphs' shared memory pool, from the first capture
        # One metadata object per bucket: the backend's capture hooks and the captured forward
        # see the same one.
        self.metas = {bs: self._meta(bs) for bs in self.batch_sizes}
        self._capture_all()

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            max_query_len=1,
            max_seq_len=self.runner.max_model_len,
            decode_only=True,
            query_start_loc_cpu=tuple(range(bs + 1)),
            seq_lens_cpu=(1,) * bs,
        )

    def _forward(self, bs: int) -> torch.Tensor:
        r = self.runner
        ctx = ForwardContext(r.backend, self.metas[bs], r.kv_cache)
        return r.model(self.input_ids[:bs], self.positions[:bs], ctx)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        backend = self.runner.backend
        for bs in reversed(self.batch_sizes):  # largest first so smaller graphs reuse its pool
            backend.capture_begin(self.metas[bs])
            try:
                self._capture(bs)
            finally:
                backend.capture_end(self.metas[bs])
        torch.cuda.synchronize()

    def _capture(self, bs: int) -> None:
        self._forward(bs)  # warm up: compiles kernels outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.outputs[bs] = self._forward(bs)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[bs] = graph

    def _replay_meta(self, bs: int, host: StepInputs) -> AttentionMetadata:
        """The bucket's static metadata with this step's host lengths (padded rows: 1)."""
        lens = tuple(host.seq_lens.tolist())
        return replace(self.metas[bs], seq_lens_cpu=lens + (1,) * (bs - len(lens)))

    def can_run(self, host: StepInputs) -> bool:
        return (
            host.decode_only
            and host.num_tokens <= self.batch_sizes[-1]
            and (host.block_tables.shape[1] <= self.block_tables.shape[1])
        )

    def run(self, host: StepInputs, dev: StepInputs) -> torch.Tensor:
        num = host.num_tokens
        bs = next(b for b in self.batch_sizes if b >= num)
        self.input_ids[:num].copy_(dev.input_ids)
        self.positions[:num].copy_(dev.positions)
        self.slot_mapping[:num].copy_(dev.slot_mapping)
        self.seq_lens[:num].copy_(dev.seq_lens)
        self.block_tables[:num, : dev.block_tables.shape[1]].copy_(dev.block_tables)
        self.block_tables[:num, dev.block_tables.shape[1] :].zero_()
        if bs > num:  # padded rows: null block, one token of context
            self.input_ids[num:bs].zero_()
            self.positions[num:bs].zero_()
            self.slot_mapping[num:bs].zero_()
            self.seq_lens[num:bs].fill_(1)
            self.block_tables[num:bs].zero_()
        backend = self.runner.backend
        if type(backend).prepare_replay is not AttentionBackend.prepare_replay:
            # only a backend that uses the hook pays for this step's host metadata
            backend.prepare_replay(self._replay_meta(bs, host))
        self.graphs[bs].replay()
        return self.outputs[bs][:num]
