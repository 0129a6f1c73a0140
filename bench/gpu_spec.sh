#!/usr/bin/env bash
# One GPU-host call for speculative decoding: the CUDA exactness check (tiny model, float32, CUDA
# graphs on and off), then bench/spec_cost.py (Llama-3-8B shape, dummy bf16 weights): the
# engine step with k drafts verified per request against a plain decode step, batch 1..256.
# Logs under $OUT.
source bench/gpu_env.sh
OUT=${OUT:-build/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt"
timeout 150 python3 bench/spec_gpu_check.py 2>&1 | tail -5 | tee "$OUT/spec_check.txt"
timeout 360 python3 bench/spec_cost.py --batches 1,4,16,64,256 --ks 1,2,4,8 \
  2>&1 | tee "$OUT/spec_cost.txt"
