"""GGUF Q4_0, Q4_1 and Q8_0 blocks repacked, as they are, into the weight-only kernels' layout.

A GGUF block holds 32 consecutive weights of one row (ggml's blocks never cross rows):
    Q4_0: fp16 d, 16 bytes of nibbles            w = d * (q - 8)
    Q4_1: fp16 d, fp16 m, 16 bytes of nibbles    w = d * q + m
    Q8_0: fp16 d, 32 int8                        w = d * q
Byte b of the nibbles holds weight b in its low nibble and weight b + 16 in its high one (as
gguf.quants dequantizes them). The kernels' layout (engine.kernels.w4a16) is, per row,
    qweight int32 [N, K // 8]: nibble i of word j = q[8j + i];  scales, mins [N, K // 32]
with w = q * scale + min, so Q4_0 becomes scale d, min -8d (exact: d is a float16, -8d and
d * q are exact in float16 and float32 alike), and Q8_0 qweight int8 [N, K], scale d.
Dequantized in float32, the repacked weights equal gguf.quants.dequantize bit for bit.

Nothing here builds a float weight matrix: the only intermediate is one byte per weight.
Scales stay float16 (the file's own values, exact in every activation dtype's kernel, which
widens them to float32); `PackedWeight.to_dtype` casts them for a reference path.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_T = GGMLQuantizationType
GROUP_SIZE = 32  # every format here: one scale (and min) per block of 32 weights
PACKABLE_TYPES = frozenset({_T.Q4_0, _T.Q4_1, _T.Q8_0})
# bytes before the weights in a block: d (Q4_0, Q8_0), or d and m (Q4_1)
_HEADER_BYTES = {_T.Q4_0: 2, _T.Q4_1: 4, _T.Q8_0: 2}


class PackedWeight(NamedTuple):
    """One matrix in the weight-only layout: 4-bit (`mins` set) or 8-bit (`mins` None)."""

    qweight: torch.Tensor  # int32 [N, K // 8] (4-bit) or int8 [N, K] (8-bit)
    scales: torch.Tensor  # [N, K // GROUP_SIZE]
    mins: torch.Tensor | None  # [N, K // GROUP_SIZE], 4-bit only

    @property
    def bits(self) -> int:
        return 8 if self.mins is None else 4

    def to_dtype(self, dtype: torch.dtype) -> PackedWeight:
        """Scales (and mins) in `dtype`; the codes unchanged."""
        mins = None if self.mins is None else self.mins.to(dtype)
        return PackedWeight(self.qweight, self.scales.to(dtype), mins)


def repack(blocks: np.ndarray, ggml_type: GGMLQuantizationType) -> PackedWeight:
    """`blocks` uint8 [N, K // 32 * block bytes] (a RawTensor's rows, any row order) as a
    PackedWeight of N rows and K columns; tensors on the CPU, not sharing the file's memory.

    Raises ValueError for a type other than Q4_0 / Q4_1 / Q8_0 or a row of partial blocks."""
    if ggml_type not in PACKABLE_TYPES:
        raise ValueError(f"ggml type {ggml_type.name} cannot be served as it is (Q4_0, Q4_1, Q8_0)")
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    assert block_size == GROUP_SIZE
    if blocks.ndim != 2 or blocks.dtype != np.uint8 or blocks.shape[1] % type_size:
        raise ValueError(
            f"{ggml_type.name} rows: expected uint8 [N, blocks * {type_size}], got "
            f"{blocks.dtype} {blocks.shape}"
        )
    split = blocks.reshape(blocks.shape[0], -1, type_size)  # [N, blocks, bytes]
    header = _HEADER_BYTES[ggml_type]
    d = _float16(split[:, :, 0:2])
    payload = split[:, :, header:]
    if ggml_type == _T.Q8_0:
        codes = np.ascontiguousarray(payload).view(np.int8).reshape(blocks.shape[0], -1)
        return PackedWeight(torch.from_numpy(codes), torch.from_numpy(d), None)
    mins = _float16(split[:, :, 2:4]) if ggml_type == _T.Q4_1 else d * np.float16(-8)
    return PackedWeight(_pack_nibbles(payload), torch.from_numpy(d), torch.from_numpy(mins))


def _float16(pairs: np.ndarray) -> np.ndarray:
    """[N, blocks, 2] little-endian bytes as float16 [N, blocks] (a copy)."""
    return np.ascontiguousarray(pairs).view(np.float16)[..., 0]


def _pack_nibbles(nibbles: np.ndarray) -> torch.Tensor:
    """[N, blocks, 16] GGUF nibble bytes -> qweight int32 [N, blocks * 4].

    GGUF: weight b < 16 in byte b's low nibble, weight 16 + b in its high nibble. Ours: word j
    of a block holds weights 8j .. 8j + 7 in nibbles 0 .. 7. Built one nibble position at a
    time, so the largest temporary is one uint32 per 8 weights."""
    codes = np.concatenate((nibbles & 0x0F, nibbles >> 4), axis=-1)  # [N, blocks, 32]
    by_word = codes.reshape(codes.shape[0], -1, 8)  # [N, K // 8, 8]: word j, nibble i
    words = np.zeros(by_word.shape[:2], dtype=np.uint32)
    for i in range(8):
        words |= by_word[:, :, i].astype(np.uint32) << np.uint32(4 * i)
    return torch.from_numpy(words.view(np.int32))


class GGUFRows(NamedTuple):
    """Rows (and whole blocks of columns) of one GGUF tensor as stored: what a GGUF weight
    source hands a layer's loader in place of float rows. `shape` is the logical
    [rows, columns] the layer checks; `blocks` the uint8 block bytes of exactly those."""

    blocks: np.ndarray
    ggml_type: GGMLQuantizationType
    shape: tuple[int, int]
