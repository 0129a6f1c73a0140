"""The typed error a tensor-parallel group raises when one of its ranks fails."""

from __future__ import annotations

from engine.errors import TandemError


class TPGroupError(TandemError, RuntimeError):
    """A rank of the TP group died, hung or raised; the whole group is unusable afterwards.

    `rank` names the culprit when it is known (None when no rank could be singled out)."""

    def __init__(self, rank: int | None, message: str) -> None:
        who = f"tensor-parallel rank {rank}" if rank is not None else "tensor-parallel group"
        super().__init__(f"{who} {message}")
        self.rank = rank
