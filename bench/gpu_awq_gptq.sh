#!/usr/bin/env bash
# AWQ / GPTQ checkpoints served as stored (issue 18, engine.quant.awq_gptq) on one H100 or H200:
# tests/engine/test_awq_gptq.py on CUDA, bounded (under 4 minutes), output to $OUT/awq_gptq.log.
# What the CUDA case checks (the CPU cases run too): tiny AWQ and GPTQ checkpoints written by the
# test load with float16 scales and mins (dequantized weights within 1/64 of a quantization step
# of each format's formula), the W4A16 kernel on a repacked layer equals its torch reference for
# M = 1, 3, 40, and LLM serves them in bfloat16 with CUDA graphs. No timing: the kernel is int4's
# (bench/gpu_quant.sh measures it); only the scales' dtype differs from int4 on load (float16).
# Carry: nothing (torch, triton, transformers, safetensors).
source bench/gpu_env.sh
OUT=${OUT:-build/gpu}
mkdir -p "$OUT"
LOG=$OUT/awq_gptq.log
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader | tee -a "$LOG"
step awq_gptq_tests 220 python3 -m pytest -q tests/engine/test_awq_gptq.py --timeout 200 \
  -p no:cacheprovider -rfs
