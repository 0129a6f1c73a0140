"""The model runner: loads the model, owns the KV cache, runs one step.

`execute(out)` reads a SchedulerOutput and returns a RunnerOutput; it never mutates scheduler
state. Its stages: `build_step_inputs` (host) -> `forward` (device: the attention backend's
`plan`, then the model; or `prepare_replay`, then a CUDA graph for small decode steps) ->
`sampler` (device, batched). With speculative decoding, rows with lookahead slots first get
draft tokens from the proposer (engine.spec.proposer), the forward pass runs a view of the
step whose rows end with their drafts, and the verifier (engine.spec.verify) turns the k + 1
logits rows of each such request into its accepted tokens. The KV cache is allocated from `kv_spec` (engine/kv/spec.py), the
one description of it every consumer reads.

Under tensor parallelism this runner is rank 0's: `step_scope` (engine.distributed's
TPExecutor.step) publishes each step's inputs to the followers, which run `forward` and
`compute_logits` on their shards; failures inside the scope raise TPGroupError.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from engine.attention.select import get_attention_backend
from engine.config import EngineConfig, ModelConfig, resolve_dtype
from engine.device_sync import mark_current
from engine.distributed import get_tp_group
from engine.distributed.tp_pass import apply_fused_residual_norm
from engine.models.llama import ForwardContext
from engine.models.registry import model_class
from engine.runner.cuda_graphs import DecodeGraphs
from engine.runner.inputs import StepInputs, attention_metadata, build_step_inputs
from engine.runner.kv_cache import allocate_kv_cache, kv_cache_spec, kv_torch_dtype, num_kv_blocks
from engine.sampler import SampledTokens, Sampler
from engine.scheduler.output import RunnerOutput, ScheduledRequest, SchedulerOutput
from engine.spec.factory import build_proposer
from engine.spec.verify import Verifier
from engine.weights import fill_dummy, load_safetensors


class StepHandle:
    """A launched step (`ModelRunner.launch`): `result()` waits for its tokens on the host."""

    def __init__(
        self,
        requests: list[ScheduledRequest],
        sampled: SampledTokens | None = None,
        output: RunnerOutput | None = None,
    ) -> None:
        assert (sampled is None) != (output is None), "sampled tokens or a finished output"
        self.requests = requests
        self.sampled = sampled
        self._output = output

    def wait_device(self) -> None:
        """Wait (without the GIL) until the device has run the whole step."""
        if self.sampled is not None:
            self.sampled.wait_device()

    def result(self) -> RunnerOutput:
        if self._output is None:
            assert self.sampled is not None
            picked = self.sampled.result()
            self._output = RunnerOutput(
                sampled_token_ids={
                    r.request_id: t for r, t in zip(self.requests, picked.token_ids)
                },
                logprobs={
                    r.request_id: lp
                    for r, lp in zip(self.requests, picked.logprobs)
                    if lp is not None
                },
            )
        return self._output


@contextlib.contextmanager
def _default_dtype_and_device(dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


class ModelRunner:
    def __init__(
        self,
        engine: EngineConfig,
        model_cfg: ModelConfig,
        model_path: str,
        max_model_len: int,
        device: torch.device,
        show_progress: bool = True,
        step_scope: Callable[[StepInputs], AbstractContextManager[None]] | None = None,
    ) -> None:
        self.engine_cfg = engine
        self.model_path = model_path
        self.model_cfg = model_cfg
        self.device = device
        self.dtype = resolve_dtype(model_cfg.torch_dtype)
        self.block_size = engine.block_size
        self.max_model_len = max_model_len
        # The TP group was built with its reduction (engine.distributed.process_group); these
        # name what it chose, for logs and benchmarks.
        tp = get_tp_group()
        self.all_reduce_mode = tp.all_reduce_label
        self.fp32_reduce_max_tokens = tp.reduction.fp32_max_rows
        self.model = self._load_model(show_progress)
        self.num_kv_heads_local = self.model.model.layers[0].self_attn.num_kv_heads
        # The one description of the cache: sizing, allocation and the backend all read it.
        self.kv_spec = kv_cache_spec(model_cfg, engine, tp.size, self.model, model_path)
        assert self.kv_spec.num_local_heads == self.num_kv_heads_local, "spec and model disagree"
        self.backend = get_attention_backend(
            device, engine.attention_backend, self.kv_spec, model_cfg.torch_dtype
        )
        self.bytes_per_block = self.kv_spec.bytes_per_block()
        # Every rank must agree: the scheduler on rank 0 hands out block ids for all of them.
        fit = num_kv_blocks(model_cfg, engine, device, self.kv_spec, self.dtype)
        self.num_blocks = get_tp_group().min_int(fit)
        self.kv_cache = allocate_kv_cache(self.kv_spec, self.num_blocks, device)
        self.sampler = Sampler(model_cfg.vocab_size, model_cfg.eos_token_ids, device)
        self.verifier = Verifier(self.sampler)
        self.proposer = build_proposer(engine.speculation, self)
        self.step_scope = step_scope or (lambda host: contextlib.nullcontext())
        # Overlap scheduling: the latest launched step's sampling rows and their sampled ids on
        # the device (the next step feeds them to rows with `input_pending`).
        self._last_sampled: tuple[list[ScheduledRequest], torch.Tensor] | None = None
        self.graphs: DecodeGraphs | None = None
        if device.type == "cuda" and not engine.enforce_eager:
            self.graphs = DecodeGraphs(self, engine.cuda_graph_batch_sizes)

    def release(self) -> None:
        """Drop the CUDA graphs, the KV cache and the weights (engine shutdown): their device
        memory goes back to the driver unless something else still holds them."""
        self.graphs = None
        self.kv_cache = torch.empty(0, dtype=kv_torch_dtype(self.kv_spec), device=self.device)
        self.model = None
        if self.device.type == "cuda":
            gc.collect()  # tensors in reference cycles (a graph's pool) go now, not at some later GC
            torch.cuda.empty_cache()

    def _load_model(self, show_progress: bool) -> Any:  # a LlamaForCausalLM (registry picks it)
        cls = model_class(self.model_cfg)
        max_positions = max(self.max_model_len, self.model_cfg.max_position_embeddings)
        with _default_dtype_and_device(self.dtype, self.device):
            model = cls(self.model_cfg, max_positions)
        if self.engine_cfg.load_format == "dummy":
            fill_dummy(model, self.engine_cfg.seed)
        else:
            load_safetensors(
                model, Path(self.model_path), show_progress and get_tp_group().rank == 0
            )
        # TP's fused all-reduce + norm, where the group has one: a pass over the loaded model,
        # before any CUDA graph captures it (engine.distributed.tp_pass).
        apply_fused_residual_norm(model, get_tp_group())
        return model.eval()

    @torch.inference_mode()
    def forward(
        self,
        host: StepInputs,
        layer_marks: list[torch.cuda.Event | None] | None = None,
        pending: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Hidden states of the sampled rows [S, hidden] (every rank of a TP group runs this).

        `layer_marks`, when given, gets one entry per layer: on CUDA an event recorded once that
        layer's kernels are enqueued (a CUDA graph records one event for every layer, after
        the graph); on CPU None, the layer having run by then. `pending` (input positions,
        token ids, both on the device) overwrites placeholder input ids (overlap scheduling)."""
        dev = host.to(self.device)
        if pending is not None:
            dev.input_ids.index_copy_(0, *pending)
        mark = (
            None if layer_marks is None else lambda i: layer_marks.append(mark_current(self.device))
        )
        if self.graphs is not None and self.graphs.can_run(host):
            hidden = self.graphs.run(host, dev)  # the backend's prepare_replay, then the replay
        else:
            meta = attention_metadata(host, dev)
            self.backend.plan(meta)
            ctx = ForwardContext(self.backend, meta, self.kv_cache, layer_done=mark)
            hidden = self.model(dev.input_ids, dev.positions, ctx)
        if layer_marks is not None and not layer_marks:
            layer_marks.extend([mark_current(self.device)] * self.model_cfg.num_layers)
        return hidden.index_select(0, dev.sample_indices)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden).float()

    def execute(
        self,
        out: SchedulerOutput,
        on_kv_enqueued: Callable[[list[torch.cuda.Event | None]], None] | None = None,
    ) -> RunnerOutput:
        """Run a step and wait for its tokens (`launch(...).result()`)."""
        return self.launch(out, on_kv_enqueued).result()

    @torch.inference_mode()
    def launch(
        self,
        out: SchedulerOutput,
        on_kv_enqueued: Callable[[list[torch.cuda.Event | None]], None] | None = None,
    ) -> StepHandle:
        """Enqueue a step: forward, logits, sampling. Without speculation or logprobs nothing
        here waits for the device; the handle's `result()` does. `on_kv_enqueued(layer_marks)`
        runs once the forward pass is enqueued (see `forward` for the marks)."""
        if self.proposer is not None:
            self.proposer.forget(out.finished_ids)
        if out.is_empty:
            return StepHandle([], output=RunnerOutput(sampled_token_ids={}))
        if self.proposer is not None and out.any_lookahead:
            out = self._with_drafts(out)
        host = build_step_inputs(out, self.block_size)
        requests = [s for s in out.scheduled if s.sample]
        pending = self._pending_inputs(out)
        with self.step_scope(host):
            marks: list[torch.cuda.Event | None] | None = None if on_kv_enqueued is None else []
            hidden = self.forward(host, marks, pending)
            if on_kv_enqueued is not None:
                assert marks is not None
                on_kv_enqueued(marks)
            logits = self.compute_logits(hidden)
            if any(s.num_draft_tokens for s in requests):
                handle = StepHandle(requests, output=self._verify(logits, requests))
            else:
                handle = StepHandle(requests, sampled=self.sampler.launch(logits, requests))
        self._last_sampled = None
        if handle.sampled is not None:
            self._last_sampled = (requests, handle.sampled.ids)
        if self.proposer is not None and self.proposer.observes:
            self.proposer.observe(requests, hidden, handle.result())
        return handle

    def _pending_inputs(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(input positions, token ids) on the device for the rows whose last input token is
        the previous step's sample, still in device memory (overlap scheduling)."""
        positions, pending_ids = [], []
        end = 0
        for s in out.scheduled:
            end += s.num_tokens
            if s.input_pending:
                positions.append(end - 1 - s.num_draft_tokens)
                pending_ids.append(s.request_id)
        if not positions:
            return None
        assert self._last_sampled is not None, "a pending input without a launched step"
        previous, ids = self._last_sampled
        row_of = {r.request_id: i for i, r in enumerate(previous)}  # only when overlapping
        rows = [row_of[rid] for rid in pending_ids]
        index = torch.tensor(positions + rows, dtype=torch.int64)
        if ids.device.type == "cuda":  # pinned: the copy queues behind the step in flight
            index = index.pin_memory().to(ids.device, non_blocking=True)
        return index[: len(positions)], ids.index_select(0, index[len(positions) :])

    def _with_drafts(self, out: SchedulerOutput) -> SchedulerOutput:
        """The verify view of a step: each row with lookahead ends with its drafts."""
        assert self.proposer is not None
        rows = [s for s in out.scheduled if s.num_lookahead]
        drafts = {
            s.request_id: d[: s.num_lookahead] for s, d in zip(rows, self.proposer.propose(rows))
        }
        scheduled = [
            replace(s, token_ids=s.token_ids + d, num_draft_tokens=len(d))
            if (d := drafts.get(s.request_id))
            else s
            for s in out.scheduled
        ]
        return replace(out, scheduled=scheduled)

    def _verify(self, logits: torch.Tensor, requests: list[ScheduledRequest]) -> RunnerOutput:
        verdicts = self.verifier(logits, requests)
        result = RunnerOutput(sampled_token_ids={})
        for s, v in zip(requests, verdicts):
            rid = s.request_id
            result.sampled_token_ids[rid] = v.final_token
            if s.num_draft_tokens:
                result.accepted_draft_ids[rid] = v.accepted
                result.num_draft_tokens[rid] = s.num_draft_tokens
            if v.logprobs:
                result.logprobs[rid] = v.logprobs[-1]
                if len(v.logprobs) > 1:
                    result.draft_logprobs[rid] = v.logprobs[:-1]
        return result
