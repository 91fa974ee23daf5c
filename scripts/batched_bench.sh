#!/usr/bin/env bash
# Batched decode: `xllm bench --parallel N` against llama.cpp's `llama-batched-bench` on the same
# GGUF, interleaved (A B A B …) because this machine's speed drifts; prints medians and ratios.
#
#   scripts/batched_bench.sh [GGUF] [ROUNDS]
#
# Needs target/release/xllm and llama.cpp's tools from scripts/peers.sh ($XLLM_PEERS, default
# .peers/). 128-token prompts, 64 generated tokens per sequence, 2 threads.
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF=${1:-models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
ROUNDS=${2:-3}
PEERS=${XLLM_PEERS:-$PWD/.peers}
BB="$PEERS/llama.cpp/build/bin/llama-batched-bench"
THREADS=${THREADS:-2}
PP=128; TG=64
declare -A xs ls
for round in $(seq "$ROUNDS"); do
  for n in 1 8 16; do
    x=$(target/release/xllm bench "$GGUF" -p $PP -n $TG -r 1 --parallel $n --threads $THREADS --json \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["aggregate_decode_tokens_per_second"])')
    xs[$n]+="$x "
  done
  if [ -x "$BB" ]; then
    out=$("$BB" -m "$GGUF" -c 16384 -b 2048 -ub 512 -npp $PP -ntg $TG -npl 1,8,16 -t $THREADS 2>/dev/null)
    for n in 1 8 16; do
      # Columns: | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
      l=$(echo "$out" | awk -F'|' -v b=$n '$4+0==b && $2+0=='$PP' {gsub(/ /,"",$9); print $9}')
      ls[$n]+="$l "
    done
  fi
done
median() { python3 -c 'import sys,statistics; v=[float(x) for x in sys.argv[1:]]; print(f"{statistics.median(v):.1f}" if v else "n/a")' "$@"; }
echo "| sequences | xllm aggregate decode t/s | llama-batched-bench S_TG t/s | ratio |"
echo "| --: | --: | --: | --: |"
for n in 1 8 16; do
  x=$(median ${xs[$n]}); l=$(median ${ls[$n]:-})
  r=$(python3 -c "import sys; a,b=sys.argv[1],sys.argv[2]; print(f'{float(a)/float(b):.2f}x' if b!='n/a' else 'n/a')" "$x" "$l")
  echo "| $n | $x | $l | $r |"
done
echo "xllm per-round values: 1: ${xs[1]} 8: ${xs[8]} 16: ${xs[16]}"
