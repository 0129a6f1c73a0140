"""Load a checkpoint's safetensors into a model, or fill it with random weights ("dummy").

Each parameter's `weight_loader` reads only its rank's slice through safetensors' lazy slices,
so a TP rank never materialises the whole tensor. A model maps checkpoint names onto its
parameters with `stacked_params` (a checkpoint tensor that is one shard of a fused parameter,
e.g. Llama's q_proj into qkv_proj) and `fused_params` (a checkpoint tensor that holds several
shards, e.g. Phi-3's qkv_proj: FusedTensor).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.layers.weight_source import WeightSource, copy_into, read_all, shape_of
from engine.progress import progress_bar
from engine.quant.awq_gptq import packed_tensors
from engine.quant.model_pass import quantize_linears, release_cached_memory
from engine.quant.names import PACKED_INT4

# FP8 KV scales are read by engine.runner.kv_cache (checkpoint_kv_scales), not by a layer
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq", ".k_scale", ".v_scale", ".kv_scale")
# A quantized checkpoint's static activation scales: engine.quant scales activations dynamically
_SKIPPED_QUANTIZED_SUFFIXES = (".input_scale",)


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
    with progress_bar(show_progress) as progress:
        task = progress.add_task("loading weights", total=len(files))
        for f in files:
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    yield name, handle.get_slice(name)
            progress.advance(task)


ShardId = str | int


@dataclass(frozen=True)
class FusedTensor:
    """A checkpoint tensor that stacks several of our shards along dim 0, such as Phi-3's
    `qkv_proj.weight` ([q | k | v] rows) or `gate_up_proj.weight` ([gate | up] rows).

    A model lists these as `fused_params` (checkpoint name fragment -> FusedTensor). `target`
    replaces the fragment to name our parameter; `shards` gives (shard id, rows in the full
    TP = 1 tensor) in row order. The loader hands each shard's rows, still lazy, to the
    parameter's `weight_loader` with its shard id, as if the checkpoint held them apart, so a
    TP rank reads only its rows of each shard.
    """

    target: str
    shards: tuple[tuple[ShardId, int], ...]

    @property
    def num_rows(self) -> int:
        return sum(rows for _, rows in self.shards)


class _RowRange:
    """Rows [start, start + num_rows) of a lazy WeightSource, itself lazy: an index into it
    reads only the rows (and columns) it names."""

    def __init__(self, src: WeightSource, start: int, num_rows: int) -> None:
        self.src, self.start, self.num_rows = src, start, num_rows

    def get_shape(self) -> list[int]:
        return [self.num_rows, *self.src.get_shape()[1:]]

    def __getitem__(self, index: Any) -> torch.Tensor:
        index = index if isinstance(index, tuple) else (index,)
        rows = index[0] if index else slice(None)
        assert isinstance(rows, slice) and rows.step in (None, 1), f"unsupported index {index!r}"
        lo, hi, _ = rows.indices(self.num_rows)
        return self.src[(slice(self.start + lo, self.start + max(lo, hi)), *index[1:])]


def _rows(
    src: torch.Tensor | WeightSource, start: int, num_rows: int
) -> torch.Tensor | WeightSource:
    if isinstance(src, torch.Tensor):
        return src.narrow(0, start, num_rows)
    return _RowRange(src, start, num_rows)


def _fused(model: nn.Module, name: str) -> tuple[str, FusedTensor] | None:
    fused: dict[str, FusedTensor] = getattr(model, "fused_params", {})
    for ckpt_part, spec in fused.items():
        if ckpt_part in name:
            return name.replace(ckpt_part, spec.target), spec
    return None


def _target(model: nn.Module, name: str) -> tuple[str, object]:
    stacked = getattr(model, "stacked_params", {})
    for ckpt_part, (our_part, shard_id) in stacked.items():
        if ckpt_part in name:
            return name.replace(ckpt_part, our_part), shard_id
    return name, None


def _param(params: dict[str, nn.Parameter], name: str, target: str) -> nn.Parameter:
    if target not in params:
        raise ModelLoadError(
            f"unexpected tensor {name!r} in the checkpoint (no parameter {target!r})"
        )
    return params[target]


def _load_fused(param: nn.Parameter, name: str, src: Any, spec: FusedTensor) -> None:
    """Split fused checkpoint tensor `name` into its shards, each to the per-shard loader."""
    num_rows = shape_of(src)[0]
    if num_rows != spec.num_rows:
        parts = " + ".join(f"{rows} ({shard_id})" for shard_id, rows in spec.shards)
        raise ModelLoadError(f"{name}: checkpoint has {num_rows} rows, the model expects {parts}")
    loader = getattr(param, "weight_loader", None)
    assert loader is not None, f"{name}: a fused tensor needs a sharded parameter"
    start = 0
    for shard_id, rows in spec.shards:
        loader(param, _rows(src, start, rows), shard_id)
        start += rows


def _load_one(model: nn.Module, params: dict[str, nn.Parameter], name: str, src: object) -> str:
    """Hand checkpoint tensor `name` (full or lazy) to its parameter's loader; returns the target."""
    fused = _fused(model, name)
    if fused is not None:
        target, spec = fused
        with torch.no_grad():
            _load_fused(_param(params, name, target), name, src, spec)
        return target
    target, shard_id = _target(model, name)
    param = _param(params, name, target)
    loader = getattr(param, "weight_loader", None)
    with torch.no_grad():
        if loader is None:
            copy_into(param, read_all(src), name)  # type: ignore[arg-type]
        else:
            loader(param, src, shard_id)
    return target


def checkpoint_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's parameters under the names of the checkpoint tensors they load from.

    A quantization method's parameters may differ from the checkpoint (engine.layers.linear's
    WeightSlot): one loads under another name (`checkpoint_name`: int4's `qweight` from the
    float `weight`), others are filled while it loads (`derived_on_load`) and are not expected."""
    params: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters():
        if getattr(param, "derived_on_load", False):
            continue
        leaf = getattr(param, "checkpoint_name", None)
        params[name if leaf is None else f"{name.rsplit('.', 1)[0]}.{leaf}"] = param
    return params


def _skipped(name: str, model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    if getattr(cfg, "tie_word_embeddings", False) and name == "lm_head.weight":
        return True
    quantized = getattr(cfg, "quantized_checkpoint", False)
    return name.endswith(_SKIPPED_SUFFIXES) or (
        quantized and name.endswith(_SKIPPED_QUANTIZED_SUFFIXES)
    )


def _checkpoint_tensors(
    model: nn.Module, model_dir: Path, show_progress: bool
) -> Iterator[tuple[str, object]]:
    """Each checkpoint tensor by name, lazy. An AWQ / GPTQ checkpoint's packed linears come as
    one source per layer (engine.quant.awq_gptq, which first gives those layers their method)."""
    files = safetensors_files(model_dir)
    cfg = getattr(model, "config", None)
    packed = getattr(cfg, "quantization", None) in PACKED_INT4
    if packed and getattr(cfg, "quantized_checkpoint", False):
        return packed_tensors(model, model_dir, files, show_progress)
    return _iter_slices(files, show_progress)


def load_safetensors(model: nn.Module, model_dir: Path, show_progress: bool = True) -> None:
    """Load the checkpoint in `model_dir`, each rank its slices; the linear layers are first
    given the method of `model.config.quantization` (engine.quant.model_pass); "gguf" reads
    the GGUF file behind a converted directory instead (engine.gguf.native)."""
    if getattr(getattr(model, "config", None), "quantization", None) == "gguf":
        from engine.gguf.native import load_gguf_weights

        load_gguf_weights(model, model_dir, show_progress)
        release_cached_memory(model)
        return
    quantize_linears(model)
    tensors = _checkpoint_tensors(model, model_dir, show_progress)  # may set layers' methods
    params = checkpoint_params(model)
    loaded: set[str] = set()
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    for name, src in tensors:
        if not _skipped(name, model):
            loaded.add(_load_one(model, params, name, src))
    missing = sorted(set(params) - loaded - ({"lm_head.weight"} if tied else set()))
    if missing:
        raise ModelLoadError(f"missing weights in the checkpoint: {', '.join(missing[:8])}")
    release_cached_memory(model)


# Architectures whose checkpoints store q|k|v and gate|up fused (their models' `fused_params`)
_FUSED_PROJECTIONS = ("Phi3ForCausalLM",)


def checkpoint_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The Hugging Face tensor names and full (TP = 1) shapes of the checkpoint of `cfg`."""
    if cfg.moe is not None:
        from engine.models.moe import moe_checkpoint_shapes  # it imports this module

        return moe_checkpoint_shapes(cfg)
    return dense_checkpoint_shapes(cfg)


def dense_checkpoint_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """`checkpoint_shapes` of a dense model (an MoE model's attention and norms too)."""
    h, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.down_proj.weight": (h, cfg.intermediate_size),
        }
        shapes |= _projection_shapes(cfg, p)
        if cfg.attention_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.bias": (kv,),
            }
        if cfg.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def _projection_shapes(cfg: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
    """Layer `p`'s q/k/v and gate/up weights: one tensor each, or fused as Phi-3 stores them."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    if cfg.architecture in _FUSED_PROJECTIONS:
        assert not cfg.attention_bias, "fused checkpoints with a qkv bias are not described"
        return {
            p + "self_attn.qkv_proj.weight": (q + 2 * kv, h),
            p + "mlp.gate_up_proj.weight": (2 * inter, h),
        }
    return {
        p + "self_attn.q_proj.weight": (q, h),
        p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.v_proj.weight": (kv, h),
        p + "mlp.gate_proj.weight": (inter, h),
        p + "mlp.up_proj.weight": (inter, h),
    }


def fill_dummy(model: nn.Module, seed: int) -> None:
    """Random weights for benchmarks, the same logical model at every TP size.

    Each checkpoint tensor is drawn in full from a generator seeded by (seed, its index) and
    handed to the same loaders a real checkpoint uses, so every rank keeps exactly its slice of
    the tensor a TP = 1 run would hold. Norm weights are ones. Transient memory: the largest
    full tensor (the embedding), on the model's device. Quantized linears quantize their
    slices as they load, as from a float checkpoint."""
    first = next(model.parameters())
    cfg: ModelConfig = model.config  # type: ignore[assignment]
    quantize_linears(model, from_checkpoint=False)
    params = checkpoint_params(model)
    gen = torch.Generator(device=first.device)
    loaded: set[str] = set()
    for index, (name, shape) in enumerate(checkpoint_shapes(cfg).items()):
        full = torch.empty(shape, dtype=first.dtype, device=first.device)
        if name.endswith("norm.weight"):
            full.fill_(1.0)
        else:
            full.uniform_(-0.02, 0.02, generator=gen.manual_seed(seed * 1_000_003 + index))
        loaded.add(_load_one(model, params, name, full))
    missing = sorted(
        set(params) - loaded - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    )
    assert not missing, f"checkpoint_shapes() does not cover {missing[:8]}"
    release_cached_memory(model)
