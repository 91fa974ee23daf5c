#!/usr/bin/env bash
# SmolLM2-135M quantized by llama.cpp's own `llama-quantize` into the GGUF types the speed table
# compares (docs/performance.md): models/smollm2-quants/smollm2-135m-{Q4_K_M,Q5_K_M,Q6_K,Q8_0,Q4_0}.gguf.
# The only source we can fetch is the Q4_1 GGUF (scripts/get_smollm2.sh), so it is first written
# back to an f16 GGUF (`--allow-requantize`), then quantized from that f16 file as a user would.
# Its hidden size (576) is not a multiple of 256: llama-quantize gives those tensors its own
# fallback types (Q5_0/Q5_1/Q8_0), which `xllm show` lists. Needs $XLLM_PEERS (scripts/peers.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=${XLLM_PEERS:-$PWD/.peers}
quantize="$PEERS/llama.cpp/build/bin/llama-quantize"
[ -x "$quantize" ] || { echo "no $quantize: run scripts/peers.sh llama.cpp" >&2; exit 1; }
scripts/get_smollm2.sh >/dev/null
src=$(ls models/smollm2/*.gguf | head -n1)
dest=models/smollm2-quants
mkdir -p "$dest"
f16="$dest/smollm2-135m-F16.gguf"
if [ ! -f "$f16" ]; then
  "$quantize" --allow-requantize "$src" "$f16.tmp" F16 >/dev/null 2>&1
  mv "$f16.tmp" "$f16"
fi
for t in ${TYPES:-Q4_K_M Q5_K_M Q6_K Q8_0 Q4_0}; do
  out="$dest/smollm2-135m-$t.gguf"
  [ -f "$out" ] && continue
  "$quantize" "$f16" "$out.tmp" "$t" >/dev/null 2>&1
  mv "$out.tmp" "$out"
done
ls -la "$dest"
