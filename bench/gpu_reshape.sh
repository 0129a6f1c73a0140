#!/usr/bin/env bash
# The GPU-host calls for the real-model and reshape issues (one H100 or H200), each step
# bounded by its own timeout; everything a step prints goes to $OUT/run.log.
#   bash bench/gpu_reshape.sh a   decode step time before vs after the reshape (bench/decode_ab.py
#                                 on the pre-reshape tree in .carry/before, then this tree), the
#                                 GPU tests the reshape touches; keeps .carry/gguf_a for part b
#   bash bench/gpu_reshape.sh b   SmolLM2-135M-Instruct in bf16, Tandem against transformers
#                                 (bench/real_model.py), then the decode A/B again in the other order
# The model's GGUF (94 MB) is over one call's 64 MiB: part a carries its first piece and leaves
# it in /tmp, part b carries the rest, so b must follow a on the same warm machine.
# Carry: .whl (the gguf wheel), .carry/before (a), .carry/gguf_a (a), .carry/gguf_b (b).
source bench/gpu_env.sh
LOG=$OUT/run.log
ab() { step "decode_$1" 170 python3 bench/decode_ab.py --root "$2" --label "$1" --steps 40; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$LOG"
if [ "${1:-a}" = a ]; then
  mkdir -p /tmp/hold && cp .carry/gguf_a/part /tmp/hold/gguf_a
  ab before .carry/before
  ab after .
  [ "${2:-}" = notests ] && exit 0
  step gpu_tests 240 python3 -m pytest -q -m gpu --timeout 120 -p no:cacheprovider -x \
    tests/kernels tests/engine/test_hf_equality.py tests/engine/test_kv_spec_engine.py \
    tests/engine/test_tp_pass.py tests/engine/test_step_inputs.py
else
  if [ -f /tmp/hold/gguf_a ]; then
    cat /tmp/hold/gguf_a .carry/gguf_b/part > /tmp/smollm2.gguf
    echo "$(cat .carry/gguf_b/sha256)  /tmp/smollm2.gguf" | sha256sum -c | tee -a "$LOG"
    step real_model_bf16 200 python3 bench/real_model.py --gguf /tmp/smollm2.gguf --dtype bfloat16
    step real_model_fp32 200 python3 bench/real_model.py --gguf /tmp/smollm2.gguf --dtype float32
  else
    echo "part a's piece of the GGUF is not here (a fresh machine): real-model step skipped" | tee -a "$LOG"
  fi
  [ "${2:-}" = nodecode ] || { ab after .; ab before .carry/before; }
fi
