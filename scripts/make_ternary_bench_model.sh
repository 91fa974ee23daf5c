#!/usr/bin/env bash
# A random Llama whose every matrix width is a multiple of 256, quantized by llama.cpp's own
# `llama-quantize` to TQ1_0 and TQ2_0, for the ternary kernel speed table (docs/performance.md).
# SmolLM2-135M (hidden 576) holds TQ blocks only in ffn_down (6 of its 80 MB; the rest falls back
# to Q4_0/Q8_0), so it mostly measures other kernels; here ~95 % of the bytes are TQ.
#   models/ternary-bench/llama-{F16,TQ1_0,TQ2_0}.gguf  (hidden 2048, ffn 5632, 6 layers, 16/4 heads,
#   the 320-token tokenizer of tests/fixtures/tiny-llama). Quality is meaningless; speed is not.
# Needs $XLLM_PEERS (venv with torch + transformers, llama.cpp build) and a release xllm.
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=${XLLM_PEERS:-$PWD/.peers}
quantize="$PEERS/llama.cpp/build/bin/llama-quantize"
dest=models/ternary-bench
mkdir -p "$dest/st"
if [ ! -f "$dest/st/model.safetensors" ]; then
  "$PEERS/venv/bin/python" - "$dest/st" <<'EOF'
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
out = sys.argv[1]
cfg = LlamaConfig(vocab_size=320, hidden_size=2048, intermediate_size=5632, num_hidden_layers=6,
                  num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg).to(torch.float16)
model.save_pretrained(out, safe_serialization=True)
EOF
  cp tests/fixtures/tiny-llama/tokenizer.json "$dest/st/"
fi
xllm=${XLLM:-target/release/xllm}
[ -f "$dest/llama-F16.gguf" ] || "$xllm" quantize "$dest/st" --type F16 --output "$dest/llama-F16.gguf"
for t in TQ1_0 TQ2_0; do
  [ -f "$dest/llama-$t.gguf" ] || "$quantize" "$dest/llama-F16.gguf" "$dest/llama-$t.gguf" "$t" >/dev/null 2>&1
done
ls -la "$dest"
