#!/usr/bin/env bash
# The fused MoE kernel on one H100 or H200, each step bounded by its own timeout (all of them
# together under 9 minutes); everything a step prints goes to $OUT/moe.log, the numbers to
# $OUT/moe.json.
#   bash bench/gpu_moe.sh           the kernel tests on CUDA (tests/kernels/test_fused_moe.py,
#                                   the gpu-marked Qwen3-30B shapes, the CUDA-graph replay and
#                                   the >2^31-element expert offsets included), the tiny MoE
#                                   models on CUDA (fused kernel in CUDA graphs, float32) equal
#                                   to transformers, then bench/moe.py: Qwen3-30B-A3B- and
#                                   Mixtral-8x7B-shaped layers at batch 1/16/64/256, the fused
#                                   kernel (CUDA graph and eager) vs the loop over experts vs
#                                   the active experts' bytes at the copy bandwidth measured in
#                                   the same run
#   bash bench/gpu_moe.sh sweep     the same benchmark with a grid of tile configs per case
#   bash bench/gpu_moe.sh bench     the benchmark only
# Carry: nothing (the kernel needs torch and triton only).
source bench/gpu_env.sh
LOG=$OUT/moe.log
STEP_TAIL=60
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$LOG"
mode=${1:-all}
if [ "$mode" = all ]; then
  step kernel_tests 150 python3 -m pytest -q tests/kernels/test_fused_moe.py --timeout 140 \
    -p no:cacheprovider -rf
  step model_tests 120 python3 -m pytest -q tests/engine/test_moe.py -k gpu --timeout 110 \
    -p no:cacheprovider -rf
fi
if [ "$mode" = sweep ]; then
  step bench_sweep 520 python3 bench/moe.py --sweep
else
  step bench 260 python3 bench/moe.py
fi
