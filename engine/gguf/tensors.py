"""A GGUF tensor as a torch tensor: float types kept exactly, quantized blocks dequantized."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as _dequantize_blocks

from engine.gguf.reader import RawTensor

_T = GGMLQuantizationType


def dequantize(raw: RawTensor) -> torch.Tensor:
    """`raw` as a contiguous CPU tensor of `raw.shape`: F32, F16 and BF16 in their own dtype
    (bit for bit), quantized types dequantized to float32 by gguf's reference code, the same
    code transformers uses, so both see identical weights."""
    if raw.ggml_type == _T.BF16:  # numpy has no bfloat16: the reader hands out its bytes
        as_int16 = np.array(raw.data).view(np.int16)  # a copy: the file's map is read-only
        values = torch.from_numpy(as_int16).view(torch.bfloat16)
    elif raw.ggml_type in (_T.F32, _T.F16):
        values = torch.from_numpy(np.array(raw.data))
    else:
        values = torch.from_numpy(_dequantize_blocks(np.ascontiguousarray(raw.data), raw.ggml_type))
    return values.reshape(raw.shape).contiguous()
