#!/usr/bin/env bash
# The GPU-host call for `tandem plan` (issue 20): calibrate the planner's cost profile of one
# GPU at the Llama-3-8B shape (dummy bf16 weights), with the real engine, each step bounded.
#   bash bench/gpu_plan_calibrate.sh
# Writes $OUT/profile-<gpu>-llama3-8b.json (ship it as tandem/plan/profiles/<gpu>-llama3-8b.json
# after comparing it with the figure-built h100-llama3-8b.json) and $OUT/run.log.
source bench/gpu_env.sh
LOG=$OUT/run.log
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$LOG"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -cd 'A-Za-z0-9' | tr 'A-Z' 'a-z')
echo "=== calibrate ($(date -u +%T), limit 420s)" | tee -a "$LOG"
timeout 420 python3 -m tandem.cli plan calibrate --model preset:llama-3-8b --load-format dummy \
  --dtype bfloat16 --device cuda --max-model-len 8192 --out "$OUT/profile-$GPU-llama3-8b.json" \
  2>&1 | tee -a "$LOG" | tail -20
echo "=== calibrate: rc=${PIPESTATUS[0]} ($(date -u +%T))" | tee -a "$LOG"
