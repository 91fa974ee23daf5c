#!/usr/bin/env bash
# Greedy answers of one safetensors model to a few chat prompts with each KV-cache profile, side by
# side, to check that kv_int8 / kv_fp8 leave answers unchanged or sane (docs/quantization.md).
#   scripts/kv_greedy.sh [model]      (default: models/smollm2-st)
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-models/smollm2-st}
xllm=${XLLM:-${CARGO_TARGET_DIR:-target}/release/xllm}
prompts=(
    "What is the capital of France?"
    "Name three primary colors."
    "What is 12 + 30?"
    "Write one sentence about the sea."
)
for prompt in "${prompts[@]}"; do
    echo "### $prompt"
    for profile in default kv_int8 kv_fp8; do
        name=$model; [ "$profile" = default ] || name="$model:$profile"
        answer=$("$xllm" run "$name" "$prompt" --temperature 0 -n 48 | tr '\n' ' ')
        echo "- $profile: $answer"
    done
done
