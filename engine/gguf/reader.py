"""Open and validate a GGUF file, and hand out its tensors as stored (`RawTensor`).

`GGUFCheckpoint.open()` checks everything it can before any tensor is read: that the file is a
whole GGUF, of a supported architecture, whose tensor names, types and shapes agree with the
model its metadata describes. Every failure is a ModelLoadError that names the file.

`raw_tensors()` is the seam for loading quantized weights as they are: each `RawTensor` carries
its ggml type and raw bytes (quantized blocks, or float values), already under its Hugging Face
name and in Hugging Face row order. `engine.gguf.tensors.dequantize()` turns one into floats.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.gguf.config import SUPPORTED_GGUF_ARCHITECTURES, hf_config
from engine.gguf.names import IGNORED_TENSORS, hf_name, is_rotary_permuted

_T = GGMLQuantizationType
FLOAT_TYPES = frozenset({_T.F32, _T.F16, _T.BF16})
# The block formats gguf.quants dequantizes (in numpy) that llama.cpp's Llama-family files use.
QUANTIZED_TYPES = frozenset(
    {
        _T.Q8_0,
        _T.Q4_0,
        _T.Q4_1,
        _T.Q5_0,
        _T.Q5_1,
        _T.Q2_K,
        _T.Q3_K,
        _T.Q4_K,
        _T.Q5_K,
        _T.Q6_K,
    }
)
SUPPORTED_TYPES = FLOAT_TYPES | QUANTIZED_TYPES


@dataclass(frozen=True)
class RawTensor:
    """One tensor as the file stores it, under its Hugging Face name.

    `shape` is the logical shape in torch order (`(out_features, in_features)` for a matrix).
    `data` is read-only, a view of the memory-mapped file where no rows move: float values for
    F32/F16 (BF16 as uint8 pairs), or uint8 rows of quantized blocks, one row per output
    feature. Rows are in Hugging Face order: llama.cpp's rotary permutation of Llama's q and k
    rows is already undone, which is exact on quantized data too because it moves whole rows
    (each row holds whole blocks)."""

    name: str
    gguf_name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def is_quantized(self) -> bool:
        return self.ggml_type not in FLOAT_TYPES


class GGUFCheckpoint:
    """A validated GGUF file of a Llama-family model. Build with `GGUFCheckpoint.open(path)`."""

    def __init__(
        self, path: Path, reader: GGUFReader, architecture: str, config: dict[str, Any]
    ) -> None:
        self.path = path
        self.reader = reader
        self.architecture = architecture  # general.architecture: llama, qwen2 or qwen3
        self.config = config  # the Hugging Face config.json this file describes

    @classmethod
    def open(cls, path: str | Path) -> GGUFCheckpoint:
        """Open and validate `path`; raises ModelLoadError naming the file and the problem."""
        path = Path(path)
        reader = _read(path)
        _check_within_file(path, reader)
        metadata = scalar_metadata(reader)
        arch = _architecture(path, metadata)
        _check_types(path, reader.tensors)
        return cls(path, reader, arch, _config(path, reader, metadata))

    @property
    def num_tensors(self) -> int:
        return sum(1 for t in self.reader.tensors if t.name not in IGNORED_TENSORS)

    def metadata(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def raw_tensors(self) -> Iterator[RawTensor]:
        """Every weight of the model, in file order (tensors that hold no weight skipped)."""
        for t in self.reader.tensors:
            name = hf_name(t.name)
            if name is None:  # IGNORED_TENSORS: open() rejected every other unknown name
                continue
            data = t.data
            if self.architecture == "llama" and is_rotary_permuted(t.name):
                heads = self.config["num_attention_heads"]
                if ".attn_k." in t.name:
                    heads = self.config["num_key_value_heads"]
                data = unpermute_rotary_rows(data, heads)
            yield RawTensor(name, t.name, t.tensor_type, _torch_shape(t), data)


def unpermute_rotary_rows(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation for Llama, as transformers does.

    llama.cpp's converter interleaves each head's two rotary halves (rows `[i, i + d/2]` become
    `[2i, 2i + 1]`) for its GPT-J style rope; Hugging Face rotates halves. Moves whole rows of
    the first axis, so `rows` may hold values or quantized blocks."""
    half = rows.shape[0] // num_heads // 2
    split = rows.reshape(num_heads, half, 2, *rows.shape[1:])
    return split.swapaxes(1, 2).reshape(rows.shape)


def scalar_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every metadata value that is not an array (arrays: the vocabulary and its kin)."""
    return {
        key: field.contents()
        for key, field in reader.fields.items()
        if field.types and field.types[0] != GGUFValueType.ARRAY
    }


def default_torch_dtype(types: set[GGMLQuantizationType]) -> str:
    """The dtype to run in when none is asked for (on GPU; the CPU runs float32): the file's half
    type if it has one, float32 for an all-F32 file, and bfloat16 for a quantized one (whose
    dequantized weights are float32 on disk so that a float32 run loses nothing)."""
    if _T.BF16 in types or not types <= FLOAT_TYPES:
        return "bfloat16"
    return "float16" if _T.F16 in types else "float32"


def _architecture(path: Path, metadata: Mapping[str, Any]) -> str:
    arch = str(metadata.get("general.architecture"))
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: unsupported GGUF architecture {arch!r} "
            f"(supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)})"
        )
    return arch


def _config(path: Path, reader: GGUFReader, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The Hugging Face config the metadata describes, checked against the tensors' shapes."""
    tensors = {t.name: t for t in reader.tensors}
    shapes = {name: _torch_shape(t) for name, t in tensors.items()}
    types = {t.tensor_type for t in tensors.values()}
    rope_freqs = tensors.get("rope_freqs.weight")
    config = hf_config(
        path,
        metadata,
        shapes,
        _num_tokens(reader),
        default_torch_dtype(types),
        None if rope_freqs is None else np.array(rope_freqs.data),
    )
    _check_shapes(path, config, shapes)
    return config


def _read(path: Path) -> GGUFReader:
    if not path.is_file():
        raise ModelLoadError(f"missing GGUF file: {path}")
    try:
        return GGUFReader(path)
    except Exception as exc:  # the reader raises whatever numpy or struct raise on bad bytes
        raise ModelLoadError(
            f"{path}: not a readable GGUF file (truncated or corrupt?): {exc}"
        ) from exc


def _check_within_file(path: Path, reader: GGUFReader) -> None:
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ModelLoadError(
                f"{path}: truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes}, "
                f"the file at {size}"
            )


def _check_types(path: Path, tensors: Any) -> None:
    for t in tensors:
        if t.tensor_type not in SUPPORTED_TYPES:
            raise ModelLoadError(
                f"{path}: tensor {t.name} has unsupported ggml type {t.tensor_type.name}"
            )


def _torch_shape(t: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(t.shape))  # ggml lists the fastest-moving axis first


def _num_tokens(reader: GGUFReader) -> int | None:
    field = reader.fields.get("tokenizer.ggml.tokens")
    return None if field is None else len(field.data)


def _check_shapes(
    path: Path, config: dict[str, Any], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    """Each tensor the metadata implies is present with that shape, and there are no others."""
    from engine.weights import checkpoint_shapes

    try:
        expected = checkpoint_shapes(ModelConfig.from_dict(config))
    except ModelLoadError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    by_hf_name: dict[str, str] = {}
    for gguf_name in shapes:
        name = hf_name(gguf_name)
        if name is None and gguf_name not in IGNORED_TENSORS:
            raise ModelLoadError(
                f"{path}: unexpected tensor {gguf_name!r} for a Llama-family model"
            )
        if name is not None:
            by_hf_name[name] = gguf_name
    for name, want in expected.items():
        if name not in by_hf_name:
            raise ModelLoadError(f"{path}: missing tensor for {name} (shape {want})")
        have = shapes[by_hf_name[name]]
        if have != want:
            raise ModelLoadError(
                f"{path}: tensor {by_hf_name[name]} has shape {have}, but the metadata "
                f"implies {want} ({_shape_context(config)})"
            )
    if extra := sorted(set(by_hf_name) - set(expected)):
        raise ModelLoadError(f"{path}: tensors the metadata leaves no place for: {extra[:4]}")


def _shape_context(config: dict[str, Any]) -> str:
    keys = (
        "vocab_size",
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
    )
    return ", ".join(f"{k} {config[k]}" for k in keys)
