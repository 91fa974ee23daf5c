#!/usr/bin/env bash
# Measures what the KV-cache profiles cost and save on one safetensors model, with the release
# binary: perplexity of a fixed text (docs/quantization.md, "Quality") and decode speed plus KV bytes
# at a long context (docs/quantization.md, "Speed"). Prints markdown rows.
#
#   scripts/kv_quality.sh [model] [text] [ctx]
#   default: models/smollm2-st tests/fixtures/texts/gpl3-excerpt.txt 2048
#   SKIP_PPL=1 skips the perplexity part; REPEATS sets bench repeats (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-models/smollm2-st}
text=${2:-tests/fixtures/texts/gpl3-excerpt.txt}
ctx=${3:-2048}
xllm=${XLLM:-${CARGO_TARGET_DIR:-target}/release/xllm}
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print(d['$1'])"; }

if [ -z "${SKIP_PPL:-}" ]; then
echo "| profile | perplexity | vs default |"
echo "|---|---|---|"
base=""
for profile in default kv_int8 kv_fp8; do
    name=$model; [ "$profile" = default ] || name="$model:$profile"
    ppl=$("$xllm" perplexity "$name" --file "$text" --json | json perplexity)
    if [ -z "$base" ]; then base=$ppl; fi
    echo "| $profile | $(printf %.4f "$ppl") | $(python3 -c "print(f'{($ppl/$base-1)*100:+.2f} %')") |"
done
fi

echo
echo "| profile | decode tok/s at ctx $ctx (prompt $((ctx - 64))) | vs default | KV bytes | vs default |"
echo "|---|---|---|---|---|"
base_tps=""; base_bytes=""
for profile in default kv_int8 kv_fp8; do
    name=$model; [ "$profile" = default ] || name="$model:$profile"
    out=$("$xllm" bench "$name" --ctx "$ctx" -p $((ctx - 64)) -n 32 -r "${REPEATS:-1}" --json)
    tps=$(echo "$out" | json decode_tokens_per_second)
    bytes=$(echo "$out" | json kv_cache_bytes)
    if [ -z "$base_tps" ]; then base_tps=$tps; base_bytes=$bytes; fi
    echo "| $profile | $(printf %.2f "$tps") | $(python3 -c "print(f'{$tps/$base_tps:.2f}x')") | $bytes | $(python3 -c "print(f'{$bytes/$base_bytes:.3f}x')") |"
done
