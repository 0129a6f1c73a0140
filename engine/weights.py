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

from engine.config import ModelConfig
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


def _load_one(model: nn.Module, params: dict[str, nn.Parameter], name: str, src: object) -> str:
    """Hand checkpoint tensor `name` (full or lazy) to its parameter's loader; returns the target."""
    target, shard_id = _target(model, name)
    if target not in params:
        raise ModelLoadError(f"unexpected tensor {name!r} in the checkpoint (no parameter {target!r})")
    param = params[target]
    loader = getattr(param, "weight_loader", None)
    with torch.no_grad():
        if loader is None:
            copy_into(param, read_all(src), name)  # type: ignore[arg-type]
        else:
            loader(param, src, shard_id)
    return target


def load_safetensors(model: nn.Module, model_dir: Path, show_progress: bool = True) -> None:
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    for name, src in _iter_slices(safetensors_files(model_dir), show_progress):
        if name.endswith(_SKIPPED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        loaded.add(_load_one(model, params, name, src))
    missing = sorted(set(params) - loaded - ({"lm_head.weight"} if tied else set()))
    if missing:
        raise ModelLoadError(f"missing weights in the checkpoint: {', '.join(missing[:8])}")


def checkpoint_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The Hugging Face tensor names and full (TP = 1) shapes of a Llama-family checkpoint."""
    h, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                   p + "mlp.down_proj.weight": (h, inter)}
        if cfg.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
        if cfg.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def fill_dummy(model: nn.Module, seed: int) -> None:
    """Random weights for benchmarks, the same logical model at every TP size.

    Each checkpoint tensor is drawn in full from a generator seeded by (seed, its index) and
    handed to the same loaders a real checkpoint uses, so every rank keeps exactly its slice of
    the tensor a TP = 1 run would hold. Norm weights are ones. Transient memory: the largest
    full tensor (the embedding), on the model's device."""
    first = next(model.parameters())
    cfg: ModelConfig = model.config  # type: ignore[assignment]
    params = dict(model.named_parameters())
    gen = torch.Generator(device=first.device)
    loaded: set[str] = set()
    for index, (name, shape) in enumerate(checkpoint_shapes(cfg).items()):
        full = torch.empty(shape, dtype=first.dtype, device=first.device)
        if name.endswith("norm.weight"):
            full.fill_(1.0)
        else:
            full.uniform_(-0.02, 0.02, generator=gen.manual_seed(seed * 1_000_003 + index))
        loaded.add(_load_one(model, params, name, full))
    missing = sorted(set(params) - loaded - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    assert not missing, f"checkpoint_shapes() does not cover {missing[:8]}"
