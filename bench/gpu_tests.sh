#!/usr/bin/env bash
# GPU-marked tests, one pytest process per group so a device-side assert in one group cannot
# poison the CUDA context of the others. Logs go to $OUT/gpu_tests.log.
source bench/gpu_env.sh
for group in "tests/kernels" "tests/engine/test_hf_equality.py" "tests/engine/test_sampler.py" "tests/engine/test_kvtransfer_gpu.py" "tests/distributed/test_kv_link_nccl.py" "$@"; do
  echo "=== $group"
  timeout 400 python3 -m pytest -q -m gpu "$group" --timeout 300 -p no:cacheprovider -rf 2>&1 | tail -25
done
