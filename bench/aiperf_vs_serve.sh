#!/usr/bin/env bash
# A third-party load generator (NVIDIA AIPerf) against Tandem's OpenAI-compatible HTTP port, next to
# bench/serve.py's own gRPC client on the same cluster and the same load: the real model
# (SmolLM2-135M-Instruct, `--model demo`) served by `tandem serve` on this machine's CPU, one prefill
# and one decode worker, Poisson arrivals, fixed input and output lengths (ignore_eos), best effort
# (measure latency, shed nothing: bench/serve.py sends best_effort too), loopback only.
#
#   AIPERF=/path/to/venv/bin/aiperf bash bench/aiperf_vs_serve.sh [requests] [rate] [isl] [osl]
#
# AIPerf pins its own transformers and friends: install it in a venv of its own
# (python3 -m venv /tmp/aiperf-venv && /tmp/aiperf-venv/bin/pip install aiperf). Output under
# $OUT (default build/aiperf): serve.log, tandem-serve.txt, aiperf.txt and AIPerf's artifacts.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
AIPERF=${AIPERF:-aiperf}
REQUESTS=${1:-48}
RATE=${2:-1.5}
ISL=${3:-256}
OSL=${4:-32}
OUT=${OUT:-build/aiperf}
GRPC_PORT=${GRPC_PORT:-50071}
HTTP_PORT=${HTTP_PORT:-8071}
mkdir -p "$OUT"

"$PY" -m tandem.cli serve --model demo --device cpu --port "$GRPC_PORT" --http-port "$HTTP_PORT" \
  >"$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill -INT $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 180); do
  curl -sf "http://127.0.0.1:$HTTP_PORT/health" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { cat "$OUT/serve.log"; exit 1; }
  sleep 1
done
MODEL=$(curl -sf "http://127.0.0.1:$HTTP_PORT/v1/models" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
TOKENIZER=$("$PY" -c 'from engine.demo_model import resolve_model_path; print(resolve_model_path("demo"))')
echo "model $MODEL, tokenizer $TOKENIZER; $REQUESTS requests, Poisson $RATE/s, $ISL in / $OSL out"

echo "== bench/serve.py (gRPC, Tandem's client) =="
# The CPU each load generator burns is printed: on a 2-core host it competes with the server.
TIMEFORMAT='load generator CPU: %U s user + %S s system in %R s wall'
time timeout 600 "$PY" bench/serve.py --address "127.0.0.1:$GRPC_PORT" --requests "$REQUESTS" \
  --rate "$RATE" --prompt "$ISL" --output "$OSL" | tee "$OUT/tandem-serve.txt"

echo "== AIPerf (HTTP, /v1/completions, streamed) =="
time timeout 900 "$AIPERF" profile --model "$MODEL" --url "http://127.0.0.1:$HTTP_PORT" \
  --endpoint-type completions --streaming --tokenizer "$TOKENIZER" \
  --isl "$ISL" --isl-stddev 0 --osl "$OSL" --osl-stddev 0 \
  --extra-inputs ignore_eos:true --extra-inputs "min_tokens:$OSL" --extra-inputs best_effort:true \
  --request-count "$REQUESTS" --request-rate "$RATE" --request-rate-mode poisson \
  --random-seed 0 --output-artifact-dir "$OUT/aiperf" --no-auto-plot 2>&1 | tee "$OUT/aiperf.txt"
