#!/usr/bin/env bash
# The weight-only kernels on one H100 or H200, each step bounded by its own timeout (all of them
# together under 9 minutes); everything a step prints goes to $OUT/w4a16.log, the numbers to
# $OUT/w4a16.json.
#   bash bench/gpu_w4a16.sh           the kernel tests on CUDA (tests/kernels/test_w4a16.py, the
#                                     gpu-marked full shapes and >2^31-element rows included),
#                                     then bench/w4a16.py: the W4A16 GEMV at Llama-3-8B decode
#                                     shapes vs the copy bandwidth of the same bytes, W8A16 and
#                                     bf16 beside it, and the M = 4096 GEMM vs bf16 torch.mm
#   bash bench/gpu_w4a16.sh sweep     the same benchmark with a grid of M = 1 tile configs
#   bash bench/gpu_w4a16.sh bench     the benchmark only
# Carry: nothing (the kernels need torch and triton only).
source bench/gpu_env.sh
LOG=$OUT/w4a16.log
STEP_TAIL=60
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$LOG"
mode=${1:-all}
if [ "$mode" = all ]; then
  step kernel_tests 260 python3 -m pytest -q tests/kernels/test_w4a16.py --timeout 240 \
    -p no:cacheprovider -rf
fi
if [ "$mode" = sweep ]; then
  step bench_sweep 500 python3 bench/w4a16.py --sweep
else
  step bench 260 python3 bench/w4a16.py
fi
