"""Weight quantization of the linear layers: `quantization="fp8"` (W8A8) and `"int4"` (W4A16).

A `LinearMethod` (engine.layers.linear: the seam every linear layer delegates to) says how a
layer stores its weight, loads a checkpoint shard into it and applies itself; the unquantized
method is the default. Quantization is a pass over the built model (`model_pass.quantize_linears`,
run by engine.weights before loading) that gives each column- and row-parallel linear its
method; the embeddings and the LM head stay in the model dtype.

Modules: `names` (the option's values and the checkpoint's `quantization_config`, pure),
`fp8` and `int4` (the methods and their math), `model_pass` (the pass and method choice).
This package imports nothing at import time: engine.config reads `names`.
"""
