"""Load a checkpoint's safetensors into a model, or fill it with random weights ("dummy").

Each parameter's `weight_loader` reads only its rank's slice through safetensors' lazy slices,
so a TP rank never materialises the whole tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from rich.progress import Progress
from safetensors import safe_open
from torch import nn

from engine.errors import ModelLoadError
from engine.layers.weight_source import copy_into, read_all

_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / n for n in names]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"missing model file: no *.safetensors in {model_dir}")
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f"missing model file: {f} (named in model.safetensors.index.json)")
    return files


def _iter_slices(files: list[Path], show_progress: bool) -> Iterator[tuple[str, object]]:
    with Progress(transient=True, disable=not show_progress) as progress:
        task = progress.add_task("loading weights", total=len(files))
        for f in files:
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    yield name, handle.get_slice(name)
            progress.advance(task)


def _target(model: nn.Module, name: str) -> tuple[str, object]:
    stacked = getattr(model, "stacked_params", {})
    for ckpt_part, (our_part, shard_id) in stacked.items():
        if ckpt_part in name:
            return name.replace(ckpt_part, our_part), shard_id
    return name, None


def load_safetensors(model: nn.Module, model_dir: Path, show_progress: bool = True) -> None:
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    for name, src in _iter_slices(safetensors_files(model_dir), show_progress):
        if name.endswith(_SKIPPED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        target, shard_id = _target(model, name)
        if target not in params:
            raise ModelLoadError(f"unexpected tensor {name!r} in the checkpoint (no parameter {target!r})")
        param = params[target]
        loader = getattr(param, "weight_loader", None)
        with torch.no_grad():
            if loader is None:
                copy_into(param, read_all(src), name)
            else:
                loader(param, src, shard_id)
        loaded.add(target)
    missing = sorted(set(params) - loaded - ({"lm_head.weight"} if tied else set()))
    if missing:
        raise ModelLoadError(f"missing weights in the checkpoint: {', '.join(missing[:8])}")


def fill_dummy(model: nn.Module, seed: int) -> None:
    """Random weights of the right shape, on the model's device: for benchmarks."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.uniform_(-0.02, 0.02, generator=gen)
