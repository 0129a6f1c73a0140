"""LLMEngine: the step-level API that the offline LLM and the pool workers drive.

    add_request(...)  validates and queues (errors name the field; nothing is allocated);
                      a structured-output grammar is checked here and compiles in the
                      background (engine.sampling.grammar)
    step()            requests whose grammar failed are finished with an error; then
                      out = scheduler.schedule(); handle = runner.launch(out);
                      rows = scheduler.launched(out); then the previous step, if one is in
                      flight, completes: scheduler.complete(rows, handle.result()), text
                      and stop strings. With overlap scheduling the new step stays in
                      flight while the host does that (its outputs come with the next
                      step()); otherwise it completes at once.
    abort(ids)        frees the requests' blocks at once
    stream_held_kv(f) tells `f` of each `hold_kv` request's KV as soon as the step that
                      completes its prompt is enqueued (a KV sender starts then, layer by layer)
    shutdown()        stops tensor-parallel followers (a no-op at TP = 1)

With `tensor_parallel_size > 1` this process is rank 0: engine.distributed's TPExecutor starts
one Ray actor per other rank, and the runner publishes each step's inputs to them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.config import EngineConfig, ModelConfig
from engine.detokenizer import IncrementalDetokenizer, find_stop
from engine.errors import InvalidRequestError
from engine.kv.external import ExternalKVCache, PreemptionSwap
from engine.kv.kv_manager import KVManager
from engine.kv.spec import KVCacheSpec
from engine.outputs import RequestOutput
from engine.request import Request, RequestStatus
from engine.runner.model_runner import ModelRunner, StepHandle
from engine.sampling.batch import reads_output_tokens
from engine.sampling.structured import StructuredOutputs
from engine.sampling_params import SamplingParams
from engine.scheduler.config import SchedulerConfig
from engine.scheduler.output import SchedulerOutput
from engine.scheduler.scheduler import LaunchedRow, Scheduler, SchedulerStats
from engine.spec.lookahead import LookaheadPolicy
from engine.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from engine.executor.executor import TPExecutor, TPOptions


@dataclass(frozen=True)
class HeldKVEnqueued:
    """A `hold_kv` request whose prompt's last step is enqueued but not finished.

    `block_ids` are the blocks the request will hold (`held_block_ids`) once that step ends
    with its first token (the request must end there: max_tokens 1), `block_hashes` those of
    its full prompt blocks. Layer l of the KV is written once `layer_ready[l]` completes: a CUDA
    event on the engine's stream (ordered work on another stream waits for it), or None on
    CPU, where the layer already ran."""

    request: Request
    block_ids: list[int]
    block_hashes: list[bytes]
    layer_ready: list[torch.cuda.Event | None]


def resolve_model_config(cfg: EngineConfig) -> ModelConfig:
    from engine.demo_model import resolve_model_path

    path = resolve_model_path(cfg.model)
    device = cfg.resolved_device()
    dtype = None if cfg.dtype == "auto" else cfg.dtype
    if dtype is None and device.type == "cpu":
        dtype = "float32"
    return ModelConfig.from_path(path, dtype, cfg.quantization)


def _desired_max_model_len(cfg: EngineConfig, model: ModelConfig) -> int:
    limit = model.max_position_embeddings
    if model.sliding_window:
        limit = min(limit, model.sliding_window)  # no sliding-window attention: stay inside it
    return cfg.max_model_len or limit


def _default_salt(
    model_path: str, model_cfg: ModelConfig, config: EngineConfig, spec: KVCacheSpec
) -> str:
    """What makes cached KV interchangeable: model, dtypes, weights; the KV dtype is named only
    where it differs from the model's (so default salts stay as they were), and a scaled (FP8)
    cache's scales by their digest (other scales: other numbers in the same bytes)."""
    salt = f"{model_path}|{model_cfg.torch_dtype}|{config.load_format}|{config.seed}"
    if model_cfg.quantization:  # other weights compute other KV for the same tokens
        salt = f"{salt}|q={model_cfg.quantization}"
    if spec.kv_dtype != model_cfg.torch_dtype:
        salt = f"{salt}|kv={spec.kv_dtype}"
    return f"{salt}|scales={spec.scales_digest()}" if spec.is_scaled else salt


class LLMEngine:
    def __init__(
        self, config: EngineConfig, show_progress: bool = True, tp_options: TPOptions | None = None
    ) -> None:
        """`tp_options`: timeouts and placement of the TP group (tensor_parallel_size > 1 only)."""
        from engine.demo_model import resolve_model_path

        self.config = config
        self.model_path = resolve_model_path(config.model)
        self.model_config = resolve_model_config(config)
        self.device = config.resolved_device()
        self.tokenizer = load_tokenizer(config.tokenizer or self.model_path)
        wanted = _desired_max_model_len(config, self.model_config)
        torch.manual_seed(config.seed)
        self.tp: TPExecutor | None = None
        self.runner = self._build_runner(wanted, show_progress, tp_options)
        capacity = (self.runner.num_blocks - 1) * config.block_size
        self.max_model_len = min(wanted, capacity) if config.max_model_len is None else wanted
        self.kv_spec = self.runner.kv_spec  # the cache's one description (engine/kv/spec.py)
        salt = config.model_salt or _default_salt(
            self.model_path, self.model_config, config, self.kv_spec
        )
        self.kv_manager = KVManager(
            self.runner.num_blocks, config.block_size, salt, config.enable_prefix_caching
        )
        spec = config.speculation
        if spec is not None:
            spec.check_model_len(self.max_model_len)
        self.scheduler = Scheduler(
            SchedulerConfig(
                speculation=None
                if spec is None
                else LookaheadPolicy(
                    spec.num_speculative_tokens, spec.disable_by_batch_size, spec.dynamic
                ),
                max_model_len=self.max_model_len,
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=max(config.max_num_batched_tokens, 1),
                block_size=config.block_size,
                enable_chunked_prefill=config.enable_chunked_prefill,
                enable_prefix_caching=config.enable_prefix_caching,
            ),
            self.kv_manager,
        )
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._logprobs: dict[str, list] = {}
        self.structured = StructuredOutputs(
            self.tokenizer, self.vocab_size, self.model_config.eos_token_ids
        )
        self._held_kv_listener: Callable[[HeldKVEnqueued], None] | None = None
        self.last_step_num_batched_tokens = 0  # tokens the latest step() fed (for metrics)
        overlap = config.async_scheduling
        if overlap is None:
            overlap = self.device.type == "cuda"
        # Followers of a TP group get host inputs only. Verify steps complete at once (their
        # accepted runs decide the next step); n-gram speculation overlaps the steps where it
        # is off (large batches), model-based proposers follow every step, never overlapping.
        self.overlap = (
            overlap
            and config.tensor_parallel_size == 1
            and (spec is None or spec.method == "ngram")
        )
        self._inflight: tuple[list[LaunchedRow], StepHandle] | None = None
        self.num_overlapped_steps = 0  # steps left in flight while the host went on

    def _build_runner(
        self, max_model_len: int, show_progress: bool, tp_options: TPOptions | None
    ) -> ModelRunner:
        args = (self.config, self.model_config, self.model_path, max_model_len)
        if self.config.tensor_parallel_size == 1:
            return ModelRunner(*args, self.device, show_progress)
        from engine.executor.executor import TPExecutor

        tp = self.tp = TPExecutor.launch(*args, tp_options)
        self.device = tp.device
        return tp.build_leader(
            lambda: ModelRunner(*args, tp.device, show_progress, step_scope=tp.step)
        )

    def shutdown(self) -> None:
        """Stop tensor-parallel followers and give the model's, KV cache's and CUDA graphs'
        device memory back (a later engine in this process sizes its KV cache from what is
        free); the engine cannot step afterwards. Idempotent."""
        self._inflight = None
        if self.tp is not None:
            self.tp.shutdown()
        self.structured.shutdown()
        self.runner.release()

    def use_grammar_vocab(self, vocab: Sequence[bytes]) -> None:
        """Structured output for a model without a tokenizer (dummy-weight benchmarks):
        `vocab[i]` is the bytes token i stands for; the model's EOS ids are the stop tokens."""
        self.structured.use_vocab(vocab)

    # ------------------------------------------------------------------ input

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    def tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt", "must not be empty")
            if self.tokenizer is None:
                raise InvalidRequestError("prompt", "this model has no tokenizer; send token ids")
            return list(self.tokenizer.encode(prompt))
        ids = list(prompt)
        if not ids:
            raise InvalidRequestError("prompt_token_ids", "must not be empty")
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                "prompt_token_ids", f"{bad[0]!r} is outside the vocabulary [0, {self.vocab_size})"
            )
        return ids

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        params.check_vocab(self.vocab_size)
        self.structured.check(params)
        if len(prompt_ids) >= self.max_model_len:
            raise InvalidRequestError(
                "prompt",
                f"{len(prompt_ids)} tokens; must be shorter than max_model_len {self.max_model_len}",
            )
        if (
            params.max_tokens is not None
            and len(prompt_ids) + params.max_tokens > self.max_model_len
        ):
            raise InvalidRequestError(
                "max_tokens",
                f"{params.max_tokens} new tokens after a {len(prompt_ids)}-token prompt exceed "
                f"max_model_len {self.max_model_len}",
            )

    def add_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        priority: int = 0,
        deadline: float | None = None,
        hold_kv: bool = False,
    ) -> Request:
        """Validate and queue a request. Raises InvalidRequestError naming the field.

        `hold_kv`: when it finishes (not aborted) its blocks stay allocated in
        `request.held_block_ids` for a KV lease; free them with `release_blocks()`."""
        params = params or SamplingParams()
        request = self._new_request(request_id, prompt, params, priority, deadline, hold_kv)
        self.scheduler.add_request(request)
        self.structured.track(request)
        if self.tokenizer is not None:
            self._detok[request_id] = IncrementalDetokenizer(
                self.tokenizer, request.prompt_token_ids, params.skip_special_tokens
            )
        if params.logprobs is not None:
            self._logprobs[request_id] = []
        return request

    def _new_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams,
        priority: int,
        deadline: float | None,
        hold_kv: bool = False,
    ) -> Request:
        """A validated request, not yet queued (raises InvalidRequestError naming the field)."""
        prompt_ids = self.tokenize(prompt)
        self.validate(prompt_ids, params)
        request = Request(
            request_id=request_id,
            prompt_token_ids=prompt_ids,
            sampling_params=params,
            eos_token_ids=self.model_config.eos_token_ids,
            priority=priority,
            deadline=deadline,
            hold_kv=hold_kv,
        )
        self.structured.attach(request)
        return request

    def abort(self, request_ids: Iterable[str]) -> list[Request]:
        aborted = self.scheduler.abort(list(request_ids))
        for r in aborted:
            self._forget(r.request_id)
        return aborted

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    # ------------------------------------------------------------------ step

    def step(self) -> list[RequestOutput]:
        """Schedule and launch a step; return the outputs of the step that completes now: this
        one, or with overlap scheduling the one launched by the previous call (this one stays
        in flight while the host completes that one)."""
        outputs = self._finish_failed_grammars()
        if self._inflight is not None and self.scheduler.speculation_active():
            # drafts need every running request's newest token on the host
            outputs += self._complete(*self._inflight)
            self._inflight = None
        out = self.scheduler.schedule()
        if out.is_empty and self._inflight is None:
            self.structured.wait_for_compiles()
        self.last_step_num_batched_tokens = out.num_batched_tokens
        handle = self.runner.launch(out, self._held_kv_hook(out))
        if self.kv_manager.external is not None:
            self.kv_manager.external.step_done()
        rows = self.scheduler.launched(out)
        previous, self._inflight = self._inflight, None
        if previous is not None:
            outputs += self._complete(*previous)
        if self._may_overlap(out):
            self._inflight = (rows, handle)
            self.num_overlapped_steps += 1
        else:
            outputs += self._complete(rows, handle)
        return outputs

    def _may_overlap(self, out: SchedulerOutput) -> bool:
        """Whether `out` may stay in flight while the next step is scheduled: not where the
        next step's sampling reads this one's tokens on the host (penalties, min_tokens,
        seeds, grammars), nor a verify step, nor where KV leaves the device stream's order
        (a prefix tier's spills, a KV stream of held prompts). The preemption swap stays: it
        reads and writes blocks on the engine's stream, after the step in flight."""
        return (
            self.overlap
            and not out.is_empty
            and not out.any_lookahead
            and self.kv_manager.external is None
            and self._held_kv_listener is None
            and not any(s.sample and reads_output_tokens(s) for s in out.scheduled)
        )

    def _complete(self, rows: list[LaunchedRow], handle: StepHandle) -> list[RequestOutput]:
        result = handle.result()
        updated = self.scheduler.complete(rows, result)
        for rid, lp in result.logprobs.items():
            if rid in self._logprobs:
                self._logprobs[rid].extend([*result.draft_logprobs.get(rid, ()), lp])
        return [self._output(r) for r in updated]

    def _finish_failed_grammars(self) -> list[RequestOutput]:
        """End (aborted, with `error`) the scheduled requests whose grammar failed: it did not
        compile, or a sampled token broke it. Their final output carries no new token."""
        outputs = []
        for request in self.structured.failed():
            if self.scheduler.get_request(request.request_id) is not request:
                continue  # prefilled elsewhere, not running yet: it fails once activated
            assert request.grammar is not None
            request.error = f"structured: {request.grammar.error}"
            self.scheduler.finish(request.request_id, RequestStatus.FINISHED_ABORTED)
            outputs.append(self._output(request, new_token=False))
        return outputs

    def stream_held_kv(self, listener: Callable[[HeldKVEnqueued], None] | None) -> None:
        """Calls `listener` (on the engine thread, inside `step()`) for every `hold_kv` request
        whose prompt completes in the step, once its forward pass is enqueued and before the
        step waits for it. A listener must not raise: the step would fail with it."""
        self._held_kv_listener = listener

    def _held_kv_hook(
        self, out: SchedulerOutput
    ) -> Callable[[list[torch.cuda.Event | None]], None] | None:
        listener = self._held_kv_listener
        if listener is None:
            return None
        finals = []
        for s in out.scheduled:
            request = self.scheduler.get_request(s.request_id)
            if (
                s.sample
                and request is not None
                and request.hold_kv
                and request.num_output_tokens == 0
            ):
                finals.append((request, list(s.block_ids)))
        if not finals:
            return None

        def hook(layer_ready: list[torch.cuda.Event | None]) -> None:
            for request, block_ids in finals:
                hashes = self.kv_manager.block_hashes(
                    request, request.num_prompt_tokens // self.config.block_size
                )
                listener(HeldKVEnqueued(request, block_ids, hashes, layer_ready))

        return hook

    def _output(self, request: Request, new_token: bool = True) -> RequestOutput:
        """`new_token`: this step gave the request its latest `num_new_tokens` output tokens."""
        rid = request.request_id
        num_new = max(1, request.num_new_tokens) if new_token else 0
        new_ids = request.output_token_ids[len(request.output_token_ids) - num_new :]
        detok = self._detok.get(rid)
        if detok is not None and request.sampling_params.stop and not request.status.finished:
            new_ids, delta = self._detokenize_until_stop(request, detok, new_ids)
        else:
            delta = detok.add(new_ids) if detok is not None else ""
        output = RequestOutput(
            request_id=rid,
            prompt_token_ids=request.prompt_token_ids,
            token_ids=list(request.output_token_ids),
            text=detok.text if detok is not None else "",
            new_token_ids=list(new_ids),
            text_delta=delta,
            finished=request.status.finished,
            finish_reason=request.finish_reason.value if request.finish_reason else None,
            stop_reason=request.stop_reason,
            logprobs=self._logprobs.get(rid),
            num_cached_tokens=request.num_cached_tokens,
            error=request.error,
        )
        if output.finished:
            self._forget(rid)
        return output

    def _detokenize_until_stop(
        self, request: Request, detok: IncrementalDetokenizer, new_ids: list[int]
    ) -> tuple[list[int], str]:
        """Add the step's tokens one at a time; a stop string ends the request at the token
        that completed it, and the tokens after it (accepted drafts) are dropped."""
        delta = ""
        for i, token in enumerate(new_ids):
            delta += detok.add([token])
            delta = self._apply_stop_strings(request, detok, delta)
            if request.status.finished:
                dropped = len(new_ids) - i - 1
                if dropped:
                    del request.output_token_ids[-dropped:]
                    logprobs = self._logprobs.get(request.request_id)
                    if logprobs:
                        del logprobs[-dropped:]
                return new_ids[: i + 1], delta
        return new_ids, delta

    def _apply_stop_strings(
        self, request: Request, detok: IncrementalDetokenizer, delta: str
    ) -> str:
        params = request.sampling_params
        hit = find_stop(detok.text, len(delta), params.stop)
        if hit is None:
            return delta
        index, stop = hit
        end = index + len(stop) if params.include_stop_str_in_output else index
        kept_before = len(detok.text) - len(delta)
        detok.text = detok.text[:end]
        self.scheduler.finish(request.request_id, RequestStatus.FINISHED_STOPPED, stop)
        return detok.text[kept_before:]

    def _forget(self, request_id: str) -> None:
        self._detok.pop(request_id, None)
        self._logprobs.pop(request_id, None)
        self.structured.forget(request_id)

    def attach_external_cache(self, cache: ExternalKVCache) -> None:
        """A cache below HBM (e.g. kvtransfer's CPU / NVMe tiers): evicted prefix blocks spill
        into it and later prefix lookups load from it (engine/kv/external.py)."""
        self.kv_manager.attach_external(cache)

    def attach_preemption_swap(self, swap: PreemptionSwap) -> None:
        """Preempted requests swap their KV out (e.g. to the CPU tier) instead of recomputing."""
        self.scheduler.attach_swap(swap)

    # ---------------------------------------------------- disaggregation hooks

    def release_blocks(self, block_ids: list[int]) -> None:
        """Free blocks held for a KV lease (`hold_kv`) or returned by a failed transfer."""
        self.kv_manager.release(block_ids)

    def add_prefilled(
        self,
        request_id: str,
        prompt_ids: list[int],
        first_token: int | None,
        params: SamplingParams,
        priority: int = 0,
        deadline: float | None = None,
        first_text: str = "",
    ) -> Request | None:
        """Accept a request prefilled elsewhere: allocate blocks for its prompt's KV, which a
        transfer will write. Returns the request (not yet running), or None when the pool has
        no room now (nothing is held then). Call `activate_prefilled` once the KV landed.
        `first_token` None: the prefill has not sampled it yet (its KV streams in while it
        computes); pass it to `set_first_token` before activating."""
        request = self._new_request(request_id, prompt_ids, params, priority, deadline)
        if self._inflight is not None:
            # A transfer writes these blocks from another stream: a block freed while the step
            # in flight still writes to it (an aborted request's) must be past that write.
            self._inflight[1].wait_device()
        if not self.kv_manager.can_allocate_slots(request, request.num_prompt_tokens):
            self.structured.drop(request)
            return None
        self.kv_manager.allocate_slots(request, request.num_prompt_tokens)
        self.structured.track(request)
        if params.logprobs is not None:
            self._logprobs[request_id] = []
        if first_token is not None:
            self.set_first_token(request, first_token, first_text)
        return request

    def set_first_token(self, request: Request, first_token: int, first_text: str = "") -> None:
        """The first token (and its text) of a request from `add_prefilled(first_token=None)`."""
        if request.output_token_ids:
            raise ValueError(f"request {request.request_id!r} already has its first token")
        request.output_token_ids.append(first_token)
        if self.tokenizer is not None:
            params = request.sampling_params
            detok = IncrementalDetokenizer(
                self.tokenizer, request.prompt_token_ids + [first_token], params.skip_special_tokens
            )
            detok.text = first_text
            self._detok[request.request_id] = detok

    def activate_prefilled(self, request: Request) -> None:
        """The prompt's KV is in the request's blocks (and its first token is set): join the
        running batch."""
        if not request.output_token_ids:
            raise ValueError(
                f"request {request.request_id!r} has no first token yet (set_first_token)"
            )
        request.num_computed_tokens = request.num_prompt_tokens
        self.scheduler.add_running(request)

    def drop_prefilled(self, request: Request) -> list[int]:
        """Forget a request whose KV never landed; returns its blocks, which the caller frees
        (at once, or through the receiver's release callback if a transfer may still write)."""
        self._forget(request.request_id)
        self.structured.drop(request)
        return self.kv_manager.detach(request)
