#!/usr/bin/env bash
# Constrained vs unconstrained decode speed (docs/performance.md, "Structured output"): xllm bench
# through the scheduler at batch 1 and batch 8, without and with a JSON Schema, interleaved
# A B A B (ROUNDS rounds), medians of the aggregate decode tok/s.
# Usage: scripts/bench_structured.sh MODEL [ROUNDS] [THREADS]
set -euo pipefail
MODEL=${1:?model}
ROUNDS=${2:-3}
THREADS=${3:-2}
XLLM=${XLLM:-target/release/xllm}
SCHEMA=$(mktemp --suffix=.json)
# A long string: the grammar stays open for every generated token (the answer never ends early),
# and a JSON string is the state most constrained tokens are generated in.
echo '{"type":"object","properties":{"text":{"type":"string","minLength":4000}},"required":["text"]}' > "$SCHEMA"
out=$(mktemp)
for round in $(seq "$ROUNDS"); do
  for batch in 1 8; do
    for mode in free schema; do
      extra=()
      [ "$mode" = schema ] && extra=(--json-schema "$SCHEMA")
      "$XLLM" bench "$MODEL" -p 64 -n 128 -r 1 --parallel "$batch" \
        --threads "$THREADS" --json "${extra[@]}" |
        python3 -c "import json,sys; r=json.load(sys.stdin); print('$batch $mode', r['aggregate_decode_tokens_per_second'], r['grammar_ms_per_token'], r['grammar_mask_share'])" >> "$out"
    done
  done
done
python3 - "$out" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    b, m, tps, gms, share = line.split()
    rows.setdefault((int(b), m), []).append((float(tps), float(gms), float(share)))
print("| batch | unconstrained tok/s | constrained tok/s | ratio | grammar ms/token | tokens needing a mask |")
print("|---|---|---|---|---|---|")
for b in (1, 8):
    free = statistics.median(r[0] for r in rows[(b, "free")])
    con = statistics.median(r[0] for r in rows[(b, "schema")])
    gms = statistics.median(r[1] for r in rows[(b, "schema")])
    share = statistics.median(r[2] for r in rows[(b, "schema")])
    print(f"| {b} | {free:.1f} | {con:.1f} | {con / free:.2f} | {gms:.3f} | {share * 100:.1f}% |")
PY
rm -f "$SCHEMA" "$out"
