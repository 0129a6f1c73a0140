"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the
(padded) vocabulary. Lookups outside a rank's slice contribute zeros before the all-reduce;
the head's logits are all-gathered and trimmed back to the true vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import get_tp_group
from engine.layers.weight_source import WeightSource, copy_into, read_narrow, shape_of
from engine.utils.math import cdiv

VOCAB_PADDING = 64


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    multiple = VOCAB_PADDING * tp_size
    return cdiv(vocab_size, multiple) * multiple


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__()
        self.tp = get_tp_group()
        self.vocab_size = vocab_size
        self.num_local = padded_vocab_size(vocab_size, self.tp.size) // self.tp.size
        self.start = self.tp.rank * self.num_local
        self.weight = nn.Parameter(torch.empty(self.num_local, hidden), requires_grad=False)
        self.weight.weight_loader = self._load  # type: ignore[attr-defined]

    def _load(
        self, param: nn.Parameter, src: torch.Tensor | WeightSource, shard_id: object = None
    ) -> None:
        rows = max(0, min(self.num_local, shape_of(src)[0] - self.start))
        param.data.zero_()  # padded rows stay zero
        if rows:
            copy_into(
                param.data.narrow(0, 0, rows), read_narrow(src, 0, self.start, rows), "embedding"
            )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        inside = (local >= 0) & (local < self.num_local)
        out = F.embedding(local.clamp(0, self.num_local - 1), self.weight)
        out = out * inside.unsqueeze(-1).to(out.dtype)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over the full vocabulary; `tie_to` shares the embedding's weight."""

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits = self.tp.all_gather_last_dim(F.linear(hidden, self.weight))
        return logits[..., : self.vocab_size]
