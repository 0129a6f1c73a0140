"""GGUF checkpoints (llama.cpp's format) for the Llama family: llama (and Mistral, which
llama.cpp writes as llama), qwen2 and qwen3; F32, F16, BF16 and the classic and K-quant block
types, dequantized.

`reader` opens and validates a file and yields its tensors as stored (the seam for loading
quantized blocks as they are), `tensors` dequantizes one, `config` and `tokenizer` turn the
metadata into Hugging Face files, and `convert` caches the result as a checkpoint directory
(the default: every weight dequantized on load). `quant` repacks Q4_0 / Q4_1 / Q8_0 blocks into
the weight-only kernels' layout and `native` loads a file's linear weights that way
(`quantization="gguf"`, with engine.quant.gguf's method).
"""

from engine.gguf.convert import ensure_converted

__all__ = ["ensure_converted"]
