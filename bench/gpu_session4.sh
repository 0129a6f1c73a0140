#!/usr/bin/env bash
# The GPU-host calls of session 2026-12-07 (4), each under one device call's 10 minutes, every
# step bounded by its own timeout; logs to $OUT/run.log, each bench's JSON under $OUT.
#   bash bench/gpu_session4.sh spec    issue 17: the CUDA exactness check, then bench/spec_cost.py
#                                      (verify cost at k = 1..8, batch 1..256, Llama-3-8B shape,
#                                      dummy bf16 weights); issue 18: the quantization tests on CUDA
#   bash bench/gpu_session4.sh quant   issue 18: bench/engine.py batch-1 decode and 4k prefill for
#                                      bf16, fp8 and int4 weights (Llama-3-8B shape, dummy weights),
#                                      then bench/w4a16.py (the kernels vs copy bandwidth)
#   bash bench/gpu_session4.sh kv      issue 18: the FP8 KV kernel tests, bench/attention.py --fp8-kv
#   bash bench/gpu_session4.sh overlap issue 19: overlap scheduling's CUDA tests (HF equality with
#                                      it on), bench/engine.py with it off and on
#   bash bench/gpu_session4.sh peer    gpt-fast (carried in .carry/gptfast); bench/spec_cost.py
#   bash bench/gpu_session4.sh final   the LM head in the decode graphs (HF equality on CUDA),
#                                      bench/engine.py, the W4A16 GEMV's CUDA tests and sweep, the
#                                      FP8 KV decode sweep, speculation as shipped at batch 256
#   bash bench/gpu_session4.sh engine  issue 19: gpt-fast (carried in .carry/gptfast) and
#                                      bench/engine.py in the same call
# Carry .whl (and .carry/gptfast for `engine`).
source bench/gpu_env.sh
OUT=${OUT:-build/gpu}
mkdir -p "$OUT"
LOG=$OUT/run.log
STEP_TAIL=${STEP_TAIL:-25}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee -a "$LOG"
part=${1:-spec}
case $part in
spec)
  step spec_check 110 python3 bench/spec_gpu_check.py
  step spec_cost 330 python3 bench/spec_cost.py --batches 1,4,16,64,256 --ks 1,2,4,8
  step quant_tests 100 python3 -m pytest -q tests/engine/test_quant_math.py \
    tests/engine/test_quant_loading.py tests/engine/test_quant_cuda.py --timeout 90 -p no:cacheprovider -rf
  ;;
quant)
  for q in none fp8 int4; do
    qarg=(); [ "$q" = none ] || qarg=(--quantization "$q")
    step "engine_$q" 125 python3 bench/engine.py --skip-peer --skip-offline --batches 1 "${qarg[@]}"
  done
  step w4a16 160 python3 bench/w4a16.py
  ;;
kv)
  step fp8_kernel_tests 150 python3 -m pytest -q tests/kernels/test_rope_kv_store.py \
    tests/kernels/test_paged_decode_attention.py tests/kernels/test_extend_attention.py \
    tests/kernels/test_triton_backend.py -k fp8 --timeout 140 -p no:cacheprovider -rf
  step attention_fp8_kv 120 python3 bench/attention.py --fp8-kv
  ;;
overlap)
  step overlap_tests 200 python3 -m pytest -q tests/engine/test_async_scheduling.py \
    tests/engine/test_hf_equality.py -k "cuda or gpu" --timeout 150 -p no:cacheprovider -rf
  step engine_sync 170 python3 bench/engine.py --skip-peer --batches 1,64,256 --async-scheduling off
  step engine_overlap 170 python3 bench/engine.py --skip-peer --batches 1,64,256 --async-scheduling on
  ;;
peer)
  OUT=$OUT PEER_STEPS=200 TORCHINDUCTOR_COMPILE_THREADS=16 step gptfast 300 python3 .carry/gptfast/peer_bench.py
  step spec_cost 200 python3 bench/spec_cost.py --batches 1,16,64,256 --ks 1,2,4,8
  ;;
final)
  step gpu_tests 110 python3 -m pytest -q tests/engine/test_async_scheduling.py \
    tests/engine/test_hf_equality.py -k "cuda or triton_backend_on_gpu" --timeout 100 \
    -p no:cacheprovider -rf
  step engine 110 python3 bench/engine.py --skip-peer --batches 1,256
  step w4a16_tests 90 python3 -m pytest -q tests/kernels/test_w4a16.py -m gpu -x --timeout 80 \
    -p no:cacheprovider -rf
  step w4a16_sweep 100 python3 bench/w4a16.py --sweep --quick --budget-s 50
  step fp8_kv_sweep 60 python3 bench/attention.py --fp8-kv --sweep
  step spec_shipped 80 python3 bench/spec_cost.py --batches 256 --ks 4 --steps 6
  ;;
engine)
  OUT=$OUT PEER_STEPS=200 step gptfast 170 python3 .carry/gptfast/peer_bench.py
  step engine 380 python3 bench/engine.py --skip-peer
  ;;
esac
