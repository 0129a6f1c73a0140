"""`method="draft_model"`: a smaller model with the target's vocabulary drafts k tokens greedily.

The draft is loaded with the target's machinery (engine.models.registry, engine.weights; random
weights under load_format="dummy") in the target's dtype, on its device. It owns a paged KV
cache of the SAME number of blocks as the target's, addressed by THE SAME block tables (each
row's `block_ids`): the scheduler allocated the target's slots for positions up to
`start_position + num_lookahead`, so the draft's slot for a position is the same index in its
own tensor, and no second allocator exists. It has its own attention backend instance
(engine.attention.select), so its `plan` never disturbs the target's.

State per request: `num_computed`, how many leading tokens have draft KV. `propose(rows)`:
1. catch-up: one batched varlen forward over every row's tokens from its `num_computed` up to
   and including its real input token. After a full acceptance that is 2 tokens (the last
   draft, never fed, and the bonus token); for a request the draft has never seen (a decode
   worker in disaggregated mode, a request just prefilled elsewhere, or one preempted and
   resumed) it is the WHOLE sequence: the draft rebuilds its prompt state where it decodes,
   rather than receiving it with the target's KV (no second transfer, no prefill-worker change;
   the price is one draft prefill on the first decode step);
2. k - 1 batched single-token steps, each feeding the previous step's argmax.
The draft then holds KV for positions < start_position + k; a later step whose accepted length
is shorter recomputes from there (`num_computed = min(num_computed, start_position)`): the KV
of rejected drafts is simply overwritten.

Hazards:
- Prefix-cache hits: a new request's shared prefix blocks may already hold draft KV written for
  the same tokens, or none at all. The draft does not trust them: a request it has no state for
  recomputes from position 0, writing the same values into the shared blocks. Draft KV only
  ever affects which tokens are proposed, never the output (verification decides).
- Memory: the draft's weights and cache come on top of what the target sized its own cache
  for. On CUDA this checks the free memory first and fails naming gpu_memory_utilization.
- Tensor parallelism is refused (speculative_config.method): the draft's layers would shard
  themselves over the TP group and wait on collectives the follower ranks never join.
- The forward passes are eager (no CUDA graphs yet) and the catch-up step is not chunked by
  max_num_batched_tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine.attention.backend import AttentionBackend
from engine.attention.select import get_attention_backend
from engine.config import ModelConfig
from engine.demo_model import resolve_model_path
from engine.device_sync import to_host
from engine.errors import EngineConfigError, ModelLoadError
from engine.models.llama import ForwardContext
from engine.models.registry import model_class
from engine.runner.inputs import attention_metadata, build_step_inputs
from engine.runner.kv_cache import allocate_kv_cache, kv_cache_spec
from engine.runner.model_runner import _default_dtype_and_device
from engine.scheduler.output import RunnerOutput, ScheduledRequest, SchedulerOutput
from engine.spec.config import SpeculativeConfig
from engine.tokenizer import load_tokenizer
from engine.weights import fill_dummy, load_safetensors

if TYPE_CHECKING:
    from engine.runner.model_runner import ModelRunner


def refuse_tensor_parallel(runner: ModelRunner | Any, method: str) -> None:
    """Model-based proposers run on rank 0 only; their layers would shard over the TP group."""
    if runner.engine_cfg.tensor_parallel_size > 1:
        raise EngineConfigError(
            f"speculative_config.method: {method!r} needs tensor_parallel_size 1 (the draft's "
            f"layers would shard over the TP group); use 'ngram' with tensor parallelism"
        )


class PagedModel:
    """A model over its own paged KV cache and attention backend, run on synthetic steps.

    `kv_cache` is indexed by the block ids of the ScheduledRequests it is given (the caller's
    block tables); block 0 is the null block and is never written by a real row."""

    def __init__(
        self, model: nn.Module, backend: AttentionBackend, kv_cache: torch.Tensor, block_size: int
    ) -> None:
        self.model = model
        self.backend = backend
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = kv_cache.device

    @torch.inference_mode()
    def hidden(self, out: SchedulerOutput, every_row: bool = False) -> torch.Tensor:
        """Final hidden states: of every fed token (`every_row`) or of each row's last one."""
        host = build_step_inputs(out, self.block_size)
        dev = host.to(self.device)
        meta = attention_metadata(host, dev)
        self.backend.plan(meta)
        hidden = self.model(
            dev.input_ids, dev.positions, ForwardContext(self.backend, meta, self.kv_cache)
        )
        return hidden if every_row else hidden.index_select(0, dev.sample_indices)

    @torch.inference_mode()
    def greedy(self, out: SchedulerOutput) -> list[int]:
        """The argmax token after each row's last fed token."""
        logits = self.model.compute_logits(self.hidden(out))  # type: ignore[operator]
        return to_host(logits.argmax(dim=-1))


def load_model(
    cfg: ModelConfig, path: str, runner: ModelRunner | Any, max_positions: int
) -> nn.Module:
    """`cfg`'s model with the target runner's dtype, device, load format and seed."""
    with _default_dtype_and_device(runner.dtype, runner.device):
        model = model_class(cfg)(cfg, max_positions)  # type: ignore[call-arg]
    if runner.engine_cfg.load_format == "dummy":
        fill_dummy(model, runner.engine_cfg.seed)
    else:
        load_safetensors(model, Path(path), show_progress=False)
    return model.eval()


def check_same_vocabulary(
    draft_cfg: ModelConfig, draft_path: str, runner: ModelRunner | Any
) -> None:
    """The draft must tokenize as the target does: same vocab_size and, where both directories
    have a tokenizer, the same token -> id map."""
    target_vocab = runner.model_cfg.vocab_size
    if draft_cfg.vocab_size != target_vocab:
        raise EngineConfigError(
            f"speculative_config.model: the draft's vocab_size {draft_cfg.vocab_size} differs "
            f"from the target's {target_vocab} ({draft_path})"
        )
    target_tok = load_tokenizer(runner.engine_cfg.tokenizer or runner.model_path)
    draft_tok = load_tokenizer(draft_path)
    if target_tok is None or draft_tok is None:
        return
    if target_tok.get_vocab() != draft_tok.get_vocab():
        raise EngineConfigError(
            f"speculative_config.model: the draft's tokenizer ({draft_path}) maps tokens to "
            f"other ids than the target's"
        )


def _check_free_memory(runner: ModelRunner | Any, cfg: ModelConfig, cache_bytes: int) -> None:
    if runner.device.type != "cuda":
        return
    weights = cfg.num_params * torch.tensor([], dtype=runner.dtype).element_size()
    free, _ = torch.cuda.mem_get_info(runner.device)
    if weights + cache_bytes > free:
        raise EngineConfigError(
            f"gpu_memory_utilization: the draft model needs {(weights + cache_bytes) / 2**20:.0f} "
            f"MiB (weights and KV cache) but {free / 2**20:.0f} MiB are free after the target's "
            f"cache; lower gpu_memory_utilization"
        )


class DraftModelProposer:
    """Drafts with a smaller model of the same vocabulary (module docstring)."""

    observes = False

    def __init__(self, config: SpeculativeConfig, runner: ModelRunner | Any) -> None:
        refuse_tensor_parallel(runner, config.method)
        assert config.model is not None  # SpeculativeConfig requires it
        path = resolve_model_path(config.model)
        try:
            cfg = ModelConfig.from_path(path, runner.model_cfg.torch_dtype)
        except ModelLoadError as err:
            raise EngineConfigError(f"speculative_config.model: {err}") from None
        check_same_vocabulary(cfg, path, runner)
        spec = kv_cache_spec(cfg, runner.engine_cfg, 1)
        _check_free_memory(runner, cfg, spec.bytes_per_block() * runner.num_blocks)
        max_positions = max(runner.max_model_len, cfg.max_position_embeddings)
        model = load_model(cfg, path, runner, max_positions)
        backend = get_attention_backend(
            runner.device, runner.engine_cfg.attention_backend, spec, cfg.torch_dtype
        )
        cache = allocate_kv_cache(spec, runner.num_blocks, runner.device)
        self.draft = PagedModel(model, backend, cache, runner.block_size)
        self.model_config = cfg
        self.num_computed: dict[str, int] = {}

    def propose(self, rows: Sequence[ScheduledRequest]) -> list[list[int]]:
        if not rows:
            return []
        drafts = [[t] for t in self.draft.greedy(self._catch_up_step(rows))]
        for j in range(1, max(r.num_lookahead for r in rows)):
            active = [i for i, r in enumerate(rows) if r.num_lookahead > j]
            step = SchedulerOutput(
                scheduled=[
                    _synthetic(rows[i], [drafts[i][-1]], rows[i].start_position + j) for i in active
                ]
            )
            for i, token in zip(active, self.draft.greedy(step)):
                drafts[i].append(token)
        for r in rows:
            self.num_computed[r.request_id] = r.start_position + r.num_lookahead
        return drafts

    def _catch_up_step(self, rows: Sequence[ScheduledRequest]) -> SchedulerOutput:
        """Every row from its first position without draft KV to its real input token."""
        scheduled = []
        for r in rows:
            sequence = r.prompt_token_ids + r.output_token_ids
            assert len(sequence) == r.seq_len, "a decode row's sequence ends at its input token"
            start = min(self.num_computed.get(r.request_id, 0), r.start_position)
            scheduled.append(_synthetic(r, sequence[start:], start))
        return SchedulerOutput(scheduled=scheduled)

    def forget(self, request_ids: Sequence[str]) -> None:
        for rid in request_ids:
            self.num_computed.pop(rid, None)

    def observe(
        self, rows: Sequence[ScheduledRequest], hidden: torch.Tensor, output: RunnerOutput
    ) -> None:
        pass


def _synthetic(row: ScheduledRequest, token_ids: list[int], start: int) -> ScheduledRequest:
    """A sampling row feeding `token_ids` from position `start` through `row`'s block table."""
    return replace(
        row,
        token_ids=token_ids,
        start_position=start,
        sample=True,
        grammar=None,
        num_lookahead=0,
        num_draft_tokens=0,
    )


def write_truncated_draft(source: Path, dest: Path, num_layers: int) -> Path:
    """A draft checkpoint of `source`'s first `num_layers` decoder layers, its final norm, its
    embedding and LM head, and its tokenizer files: a small draft that shares the vocabulary
    by construction (no training; its acceptance is what the early layers already predict)."""
    import json
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from engine.weights import safetensors_files

    dest.mkdir(parents=True, exist_ok=True)
    hf = json.loads((source / "config.json").read_text())
    if not 1 <= num_layers <= hf["num_hidden_layers"]:
        raise EngineConfigError(
            f"num_layers: {num_layers} is not in [1, {hf['num_hidden_layers']}]"
        )
    for f in source.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, dest / f.name)
    (dest / "config.json").write_text(json.dumps({**hf, "num_hidden_layers": num_layers}, indent=1))
    dropped = tuple(f"model.layers.{i}." for i in range(num_layers, hf["num_hidden_layers"]))
    kept: dict[str, torch.Tensor] = {}
    for path in safetensors_files(source):
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                if not name.startswith(dropped):
                    kept[name] = handle.get_tensor(name)
    (dest / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(kept, str(dest / "model.safetensors"))
    return dest
