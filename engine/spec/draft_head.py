"""`method="eagle"`: a small trained head drafts from the target's own final hidden state.

What it is, honestly: EAGLE's idea (draft at the feature level, autoregressively, with the
target's own LM head) WITHOUT EAGLE's decoder layer: no attention and no KV cache of its own. A
feature-level autoregressive MLP

    h_{t+1} ~ f(h_t, emb(x_{t+1})),    draft x_{t+2} = argmax lm_head(h_{t+1}),

where h_t is the target's final hidden state (after its final norm) at the position that
produced token x_{t+1}, `emb` is the target's own input embedding and `lm_head` the target's
own output head (both frozen, shared with the runner's model, never copied). k drafts are k
applications of f, batched over the step's rows. Without attention the head sees the context
only through h_t, so its acceptance falls faster with k than EAGLE's does.

It needs NO prompt state: `observe` keeps, per request, the hidden row that produced its last
token (the row `first + len(accepted drafts)` of the request's rows, proposer.py) and that
token. On a decode worker in disaggregated mode it therefore drafts from the second decode step
on (the first has no hidden state yet: it proposes nothing). A request whose kept state does not
end at its current input token (resumed after preemption) also proposes nothing for one step.

Checkpoint: a directory with `config.json` (HeadConfig: the head's sizes and the target's name
and shape it was trained for) and `model.safetensors`; `tandem train-draft`
(engine.spec.train_head) writes one. A head for another target shape is an EngineConfigError
naming speculative_config.model. Tensor parallelism is refused (speculative_config.method): the
target's embedding and LM head are sharded there and their collectives would wait on followers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from engine.config import ModelConfig
from engine.device_sync import to_host
from engine.errors import EngineConfigError
from engine.scheduler.output import RunnerOutput, ScheduledRequest
from engine.spec.config import SpeculativeConfig
from engine.spec.draft_model import refuse_tensor_parallel

if TYPE_CHECKING:
    from engine.runner.model_runner import ModelRunner

HEAD_FORMAT = "tandem-draft-head"
HEAD_VERSION = 1


def target_shape(cfg: ModelConfig) -> dict[str, Any]:
    """What a head must match in its target (the checkpoint records it)."""
    return {
        "architecture": cfg.architecture,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "num_layers": cfg.num_layers,
    }


@dataclass(frozen=True)
class HeadConfig:
    """A head's sizes and the target it was trained for (`target_name` is informational)."""

    hidden_size: int
    vocab_size: int
    intermediate_size: int
    rms_norm_eps: float
    target: dict[str, Any] = field(default_factory=dict)
    target_name: str = ""
    format: str = HEAD_FORMAT
    version: int = HEAD_VERSION

    @staticmethod
    def for_target(cfg: ModelConfig, name: str, intermediate_size: int) -> HeadConfig:
        return HeadConfig(
            cfg.hidden_size,
            cfg.vocab_size,
            intermediate_size,
            cfg.rms_norm_eps,
            target_shape(cfg),
            name,
        )

    @staticmethod
    def read(directory: Path) -> HeadConfig:
        try:
            raw = json.loads((directory / "config.json").read_text())
            if raw.get("format") != HEAD_FORMAT:
                raise ValueError(f"format {raw.get('format')!r} is not {HEAD_FORMAT!r}")
            return HeadConfig(**raw)
        except (OSError, ValueError, TypeError) as err:
            raise EngineConfigError(
                f"speculative_config.model: {directory} is not a draft-head checkpoint ({err})"
            ) from None

    def check_target(self, cfg: ModelConfig, directory: Path) -> None:
        want = target_shape(cfg)
        bad = [k for k, v in want.items() if self.target.get(k) != v]
        if self.hidden_size != cfg.hidden_size or self.vocab_size != cfg.vocab_size or bad:
            raise EngineConfigError(
                f"speculative_config.model: the head in {directory} was trained for "
                f"{self.target_name or 'another model'} {self.target}, not this target {want}"
            )


class DraftHead(nn.Module):
    """f(h, e) -> h': the target's next final hidden state from its current one and the
    embedding of the token that state produced (module docstring). Plain torch modules."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.norm_hidden = nn.RMSNorm(h, eps=eps)
        self.norm_embed = nn.RMSNorm(h, eps=eps)
        self.fuse = nn.Linear(2 * h, h)
        self.norm_mlp = nn.RMSNorm(h, eps=eps)
        self.gate_up = nn.Linear(h, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, h, bias=False)
        self.norm_out = nn.RMSNorm(h, eps=eps)

    def forward(self, hidden: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        x = self.fuse(torch.cat([self.norm_hidden(hidden), self.norm_embed(embedded)], dim=-1))
        gate, up = self.gate_up(self.norm_mlp(x)).chunk(2, dim=-1)
        return self.norm_out(x + self.down(F.silu(gate) * up))


def save_head(head: DraftHead, cfg: HeadConfig, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    state = {k: v.detach().float().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))


def load_head(
    directory: Path, target: ModelConfig, dtype: torch.dtype, device: torch.device
) -> DraftHead:
    """The head in `directory`, checked against `target` (EngineConfigError naming
    speculative_config.model on any mismatch)."""
    cfg = HeadConfig.read(directory)
    cfg.check_target(target, directory)
    head = DraftHead(cfg)
    try:
        head.load_state_dict(load_file(str(directory / "model.safetensors")))
    except (OSError, RuntimeError) as err:
        raise EngineConfigError(
            f"speculative_config.model: cannot load {directory / 'model.safetensors'} ({err})"
        ) from None
    return head.to(device=device, dtype=dtype).eval()


@dataclass(frozen=True)
class _Last:
    """A request's last token, its position, and the target's hidden row that produced it."""

    hidden: torch.Tensor
    token: int
    position: int


class DraftHeadProposer:
    """Drafts with a trained DraftHead on the target's features (module docstring)."""

    observes = True  # the head reads the target's hidden state of each sampled row

    def __init__(self, config: SpeculativeConfig, runner: ModelRunner | Any) -> None:
        refuse_tensor_parallel(runner, config.method)
        assert config.model is not None  # SpeculativeConfig requires it
        self.head = load_head(Path(config.model), runner.model_cfg, runner.dtype, runner.device)
        self.target = runner.model
        self.last: dict[str, _Last] = {}

    def observe(
        self, rows: Sequence[ScheduledRequest], hidden: torch.Tensor, output: RunnerOutput
    ) -> None:
        base = 0
        for r in rows:
            rid = r.request_id
            accepted = len(output.accepted_draft_ids.get(rid, ()))
            if rid in output.sampled_token_ids:
                self.last[rid] = _Last(
                    hidden[base + accepted].clone(),
                    output.sampled_token_ids[rid],
                    r.start_position + r.num_tokens - r.num_draft_tokens + accepted,
                )
            base += r.num_draft_tokens + 1

    @torch.inference_mode()
    def propose(self, rows: Sequence[ScheduledRequest]) -> list[list[int]]:
        live = [i for i, r in enumerate(rows) if self._ready(r)]
        drafts: list[list[int]] = [[] for _ in rows]
        if not live:
            return drafts
        hidden = torch.stack([self.last[rows[i].request_id].hidden for i in live])
        tokens = torch.tensor(
            [self.last[rows[i].request_id].token for i in live], device=hidden.device
        )
        steps = []
        for _ in range(max(rows[i].num_lookahead for i in live)):
            hidden = self.head(hidden, self.target.model.embed_tokens(tokens))
            tokens = self.target.compute_logits(hidden).argmax(dim=-1)
            steps.append(tokens)
        table = to_host(torch.stack(steps, dim=1))
        for i, row_drafts in zip(live, table):
            drafts[i] = row_drafts[: rows[i].num_lookahead]
        return drafts

    def _ready(self, row: ScheduledRequest) -> bool:
        last = self.last.get(row.request_id)
        return (
            last is not None
            and last.position == row.start_position
            and last.token == row.token_ids[-1]
        )

    def forget(self, request_ids: Sequence[str]) -> None:
        for rid in request_ids:
            self.last.pop(rid, None)
