"""Read only the part of a checkpoint tensor a rank needs (safetensors slices or plain tensors)."""

from __future__ import annotations

from typing import Any, Protocol

import torch


class WeightSource(Protocol):
    """A full tensor, or a lazy safetensors slice (`safe_open(...).get_slice(name)`)."""

    def get_shape(self) -> list[int]: ...

    def __getitem__(self, index: Any) -> torch.Tensor: ...


def shape_of(src: torch.Tensor | WeightSource) -> list[int]:
    return list(src.shape) if isinstance(src, torch.Tensor) else list(src.get_shape())


def read_narrow(
    src: torch.Tensor | WeightSource, dim: int, start: int, length: int
) -> torch.Tensor:
    """`src.narrow(dim, start, length)`, reading only those bytes when `src` is lazy."""
    if isinstance(src, torch.Tensor):
        return src.narrow(dim, start, length)
    index = [slice(None)] * len(src.get_shape())
    index[dim] = slice(start, start + length)
    return src[tuple(index)]


def read_all(src: torch.Tensor | WeightSource) -> torch.Tensor:
    return src if isinstance(src, torch.Tensor) else src[:]


def copy_into(param: torch.Tensor, loaded: torch.Tensor, what: str) -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        from engine.errors import ModelLoadError

        raise ModelLoadError(
            f"{what}: checkpoint shape {tuple(loaded.shape)} != model shape {tuple(param.shape)}"
        )
    param.data.copy_(loaded.to(param.dtype))
