#!/usr/bin/env bash
# The GPU-host calls (nvidia-h200-x2) for every figure issues 4 and 5 still owe, each step
# bounded by its own timeout so a slow or hung step costs only its share. Two calls, each
# under the 10-minute limit of one device call:  `bash bench/gpu_session.sh tp`  (steps 1-2,
# ~7 min: an 8B engine takes ~2 min to build and capture at TP = 2) and
# `bash bench/gpu_session.sh kv`  (steps 3-6, ~7 min):
#   1. bench/tp.py          TP=1 vs TP=2 (auto all-reduce, the all-reduce fused with the
#                           residual add and RMSNorm, and the no-collective ablation): bf16 greedy
#                           equality (16 tokens x 8 prompts), speedups, all-reduce share, the
#                           step breakdown and torch.profiler's kernel table, each engine in its
#                           own process; then the multi-GPU TP equality tests
#   2. bench/allreduce.py   (`allreduce`) NCCL vs one-shot all-reduce latency in CUDA graphs
#   3. bench/kv_ttft.py     what the p2p KV transfer adds to a 4k TTFT, after the prefill and
#                           streamed layer by layer during it; NCCL-path token equality (both)
#   4. bench/tier_prefix.py CPU-tier prefix TTFT against recompute, with the stage breakdown;
#      bench/tiers.py       CPU / NVMe tier GB/s next to plain pinned copies and file I/O
#   5. bench/kvtransfer.py  p2p transport GB/s next to raw send/recv
#   6. the GPU tests of the KV transports and tiers, HF equality (step inputs), and
#      the multi-GPU tests (`serve`, its own call: bench/serve.py, the real cluster on 2 GPUs,
#      KV streamed during the prefill vs started after it vs colocated); the KV group's NCCL rebuild, TP-group KV views over NCCL (incl. a
#      killed follower, whose NCCL teardown is now bounded)
# Everything a step prints goes to $OUT/run.log (appended, never piped through tail: a killed
# step keeps what it printed); each bench writes its own JSON to $OUT.
# Carry `.whl` and `.carry` (bench/gpu_env.sh installs them). Never start a second device call
# while one runs: the device answers "already running" and the first call's output is lost.
source bench/gpu_env.sh
LOG=$OUT/run.log
step() {
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $* ($(date -u +%T), limit ${limit}s)" | tee -a "$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  echo "=== $name: rc=$? ($(date -u +%T))" | tee -a "$LOG"
}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$LOG"
part=${1:-tp}
if [ "$part" = tp ]; then
  step tp 420 python3 bench/tp.py --decode-steps 30 --variants auto,fused,skip --profile \
    --engine-timeout 120
  step tp_tests 150 python3 -m pytest -q tests/kernels/test_allreduce_add_rmsnorm.py \
    tests/distributed/test_tp_equality.py -k "allreduce_add or nccl" --timeout 60 -p no:cacheprovider
elif [ "$part" = allreduce ]; then
  step allreduce 60 python3 bench/allreduce.py
elif [ "$part" = serve ]; then
  step serve 400 python3 bench/serve.py --prompt 4096 --rate 4 --requests 48 --output 64
else
  step kv_ttft 200 python3 bench/kv_ttft.py
  step tier_prefix 90 python3 bench/tier_prefix.py
  mkdir -p /tmp/tandem-nvme
  step tiers 120 python3 bench/tiers.py --nvme-dir /tmp/tandem-nvme
  step kvtransfer 90 python3 bench/kvtransfer.py
  step gpu_tests 90 python3 -m pytest -q -m gpu tests/engine/test_kvtransfer_gpu.py tests/engine/test_hf_equality.py \
    --timeout 60 -p no:cacheprovider
  step nccl_tests 150 python3 -m pytest -q -m multi_gpu tests/distributed/test_kv_link_nccl.py \
    tests/distributed/test_tp_kv_view.py --timeout 120 -p no:cacheprovider
fi
grep -v -E "Warning|warn\(|logging.cc|^\s*@|^\s*$" "$LOG" | tail -80
