#!/usr/bin/env bash
# One GPU-host call for structured output: the CUDA sampler and grammar tests, then
# bench/structured.py (Llama-3-8B shape, dummy bf16 weights) with two schemas, batch 1 and 64.
# Carry: .whl (xgrammar, apache-tvm-ffi) and .carry/smollm2-tok (the SmolLM2 tokenizer files,
# the grammar vocabulary's real pieces). Logs under $OUT.
source bench/gpu_env.sh
OUT=${OUT:-build/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/engine/test_grammar.py \
  tests/engine/test_sampler.py 2>&1 | tail -15 | tee "$OUT/tests.txt"
for schema in string records; do
  timeout 240 python3 bench/structured.py --schema "$schema" --tokenizer .carry/smollm2-tok \
    2>&1 | tee "$OUT/structured-$schema.txt"
done
