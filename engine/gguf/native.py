"""Load a GGUF file's linear weights as they are (`quantization="gguf"`), the rest dequantized.

The default path (engine.gguf.convert) dequantizes every tensor into a cached safetensors
checkpoint; that directory still serves config.json and the tokenizer here, and names its
GGUF file (gguf_source.json). This module reads the weights from that file instead:
- `apply_gguf_methods(model, checkpoint)`, a pass over the built model before loading, gives
  every linear layer whose checkpoint tensors are all Q4_0 / Q4_1 (or all Q8_0) the GGUF
  method (engine.quant.gguf); the others keep theirs;
- `load_gguf_weights(model, model_dir)` runs that pass, then hands those layers' tensors to their loaders as
  `GGUFSource`s, lazy row / column views of the file's blocks, so that the layer slices its TP
  shard and the method repacks only that, and every other tensor dequantized (float32, or its
  own float dtype), exactly what the default path would have loaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from gguf import GGMLQuantizationType
from torch import nn

from engine.errors import ModelLoadError
from engine.gguf.names import hf_name
from engine.gguf.quant import GROUP_SIZE, PACKABLE_TYPES, GGUFRows
from engine.gguf.reader import GGUFCheckpoint, RawTensor
from engine.gguf.tensors import dequantize
from engine.layers.linear import LinearBase
from engine.layers.weight_source import copy_into
from engine.progress import progress_bar
from engine.quant.gguf import GGUFLinearMethod

_T = GGMLQuantizationType
_FOUR_BIT = frozenset({_T.Q4_0, _T.Q4_1})


class GGUFSource:
    """A lazy view of one quantized GGUF matrix for a layer's `weight_loader`: indexing it with
    (rows, columns) slices returns `GGUFRows` of just those rows and blocks. `get_shape()` is
    the logical [out_features, in_features]. Raises ModelLoadError for a column range that
    cuts a block (a TP shard must hold whole blocks)."""

    def __init__(self, raw: RawTensor) -> None:
        assert raw.ggml_type in PACKABLE_TYPES and len(raw.shape) == 2, raw.name
        self.raw = raw
        self.row_bytes = raw.data.shape[1] // (raw.shape[1] // GROUP_SIZE)

    def get_shape(self) -> list[int]:
        return list(self.raw.shape)

    def __getitem__(self, index: Any) -> GGUFRows:
        index = index if isinstance(index, tuple) else (index,)
        rows = index[0]
        cols = index[1] if len(index) > 1 else slice(None)
        assert isinstance(rows, slice) and isinstance(cols, slice), f"index {index!r}"
        lo, hi, step = cols.indices(self.raw.shape[1])
        if step != 1 or lo % GROUP_SIZE or hi % GROUP_SIZE:
            raise ModelLoadError(
                f"{self.raw.name}: columns [{lo}, {hi}) cut a {GROUP_SIZE}-weight GGUF block"
            )
        data = self.raw.data[rows]
        blocks = data[:, lo // GROUP_SIZE * self.row_bytes : hi // GROUP_SIZE * self.row_bytes]
        return GGUFRows(blocks, self.raw.ggml_type, (data.shape[0], hi - lo))


def gguf_file_of(model_dir: Path) -> Path:
    """The GGUF file a converted checkpoint directory came from (its gguf_source.json)."""
    source = model_dir / "gguf_source.json"
    if not source.is_file():
        raise ModelLoadError(
            f"{model_dir}: quantization 'gguf' serves GGUF files, and this is not one "
            "(no gguf_source.json)"
        )
    return Path(json.loads(source.read_text())["gguf_file"])


def _target(model: nn.Module, name: str) -> tuple[str, object]:
    """(our parameter's name, shard id) of checkpoint tensor `name` (the model's stacking)."""
    for ckpt_part, (our_part, shard_id) in getattr(model, "stacked_params", {}).items():
        if ckpt_part in name:
            return name.replace(ckpt_part, our_part), shard_id
    return name, None


def _linear_of(model: nn.Module, target: str) -> LinearBase | None:
    module_name, _, leaf = target.rpartition(".")
    if leaf != "weight":
        return None
    module = model.get_submodule(module_name) if module_name else model
    return module if isinstance(module, LinearBase) else None


def layer_bits(model: nn.Module, checkpoint: GGUFCheckpoint) -> dict[str, int]:
    """Module name -> 4 or 8 for each linear layer the GGUF method can hold: all of its
    checkpoint tensors 4-bit (Q4_0 / Q4_1) or all Q8_0."""
    types: dict[str, set[GGMLQuantizationType]] = {}
    for tensor in checkpoint.reader.tensors:  # metadata only: no tensor data is read
        name = hf_name(tensor.name)
        target = None if name is None else _target(model, name)[0]
        if target is not None and _linear_of(model, target) is not None:
            types.setdefault(target.rpartition(".")[0], set()).add(tensor.tensor_type)
    bits = {}
    for module_name, kinds in types.items():
        if kinds <= _FOUR_BIT:
            bits[module_name] = 4
        elif kinds == {_T.Q8_0}:
            bits[module_name] = 8
    return bits


def apply_gguf_methods(model: nn.Module, checkpoint: GGUFCheckpoint) -> dict[str, int]:
    """Give each linear layer `layer_bits` names the GGUF method; returns that map."""
    bits = layer_bits(model, checkpoint)
    for module_name, width in bits.items():
        layer = model.get_submodule(module_name)
        assert isinstance(layer, LinearBase)
        layer.set_method(GGUFLinearMethod(width))
    return bits


def _sources(model: nn.Module, checkpoint: GGUFCheckpoint) -> Iterator[tuple[RawTensor, Any]]:
    """Each tensor with what its loader takes: a GGUFSource for a GGUF-method layer, else the
    dequantized tensor."""
    for raw in checkpoint.raw_tensors():
        layer = _linear_of(model, _target(model, raw.name)[0])
        if layer is not None and isinstance(layer.method, GGUFLinearMethod):
            yield raw, GGUFSource(raw)
        else:
            yield raw, dequantize(raw)


def _load_one(model: nn.Module, params: dict[str, nn.Parameter], raw: RawTensor, src: Any) -> str:
    """Hand one tensor to the parameter that loads it (`params`: by checkpoint name, as
    engine.weights.checkpoint_params names them); returns that name."""
    target, shard_id = _target(model, raw.name)
    if target not in params:
        raise ModelLoadError(f"unexpected tensor {raw.name!r} (no parameter {target!r})")
    param = params[target]
    loader = getattr(param, "weight_loader", None)
    with torch.no_grad():
        if loader is None:
            copy_into(param, src, raw.name)
        else:
            loader(param, src, shard_id)
    return target


def load_gguf_weights(model: nn.Module, model_dir: Path, show_progress: bool = True) -> None:
    """Serve the GGUF file behind `model_dir` (a directory `engine.gguf.ensure_converted`
    made) in `model`: `apply_gguf_methods`, then every tensor to its loader. Raises
    ModelLoadError for a directory that did not come from a GGUF file or a parameter left
    without a tensor; EngineConfigError (from the method) for a TP shard that cuts a block."""
    from engine.weights import checkpoint_params

    checkpoint = GGUFCheckpoint.open(gguf_file_of(model_dir))
    apply_gguf_methods(model, checkpoint)
    params = checkpoint_params(model)
    loaded: set[str] = set()
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    with progress_bar(show_progress) as progress:
        task = progress.add_task("loading GGUF weights", total=checkpoint.num_tensors)
        for raw, src in _sources(model, checkpoint):
            if not (tied and raw.name == "lm_head.weight"):
                loaded.add(_load_one(model, params, raw, src))
            progress.advance(task)
    skipped = {"lm_head.weight"} if tied else set()
    if missing := sorted(set(params) - loaded - skipped):
        raise ModelLoadError(f"missing weights in the GGUF file: {', '.join(missing[:8])}")
