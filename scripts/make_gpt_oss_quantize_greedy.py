#!/usr/bin/env python3
"""llama.cpp's greedy tokens on the GGUF files `xllm quantize` writes from the gpt-oss safetensors
fixtures (tests/quantize_gpt_oss.rs compares xllm's greedy tokens on the same files with these).

For each fixture and type: `xllm quantize tests/fixtures/FIXTURE --type TYPE`, then llama-server (llama.cpp,
built by scripts/peers.sh) loads the file and continues a few token-id prompts from the fixture's
reference text at temperature 0, `ignore_eos` (a random tiny model may emit EOS anywhere). The file's
sha256 is stored with the tokens, so the test knows the tokens belong to the file it writes.

Writes tests/fixtures/quantize/gpt_oss_tiny_llama_greedy.json (small).
Needs $XLLM_PEERS (default .peers/) with llama.cpp built, and `cargo build --release`.
Usage: python scripts/make_gpt_oss_quantize_greedy.py
"""
import hashlib
import json
import os
import subprocess
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.abspath(os.environ.get("XLLM_PEERS", os.path.join(ROOT, ".peers")))
BIN = os.path.join(PEERS, "llama.cpp", "build", "bin")
XLLM = os.environ.get("XLLM", os.path.join(ROOT, os.environ.get("CARGO_TARGET_DIR", "target"), "release", "xllm"))
OUT = os.path.join(ROOT, "tests/fixtures/quantize/gpt_oss_tiny_llama_greedy.json")
# (fixture, type, exact). The random fixture only with exact weights and short prompts: its routing
# flips on any rounding (llama.cpp's bf16 matmul rounds activations to bf16; on a 40-token prompt
# that already changes its first token). The trained one also quantized. `exact`: the test wants
# every token equal; otherwise (Q4_K_M: llama.cpp's K-quant dot products quantize the activations
# to Q8_K, xllm's kernels do not) the first token of each prompt.
FILES = [("gpt_oss_tiny", "BF16", True), ("gpt_oss_trained", "BF16", True), ("gpt_oss_trained", "Q8_0", True),
         ("gpt_oss_trained", "Q4_K_M", False)]
N_PREDICT = 16


def prompts(fixture):
    with open(os.path.join(ROOT, "tests/fixtures", fixture, "reference.json")) as f:
        ids = json.load(f)["text_ids"]
    # Short, past the sliding window (16), and longer (not for the random fixture, see FILES).
    return [ids[:5], ids[:20]] if fixture == "gpt_oss_tiny" else [ids[:5], ids[:20], ids[7:47]]


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def llama_greedy(path, prompts):
    port = 18500 + os.getpid() % 1000
    srv = subprocess.Popen([os.path.join(BIN, "llama-server"), "-m", path, "--port", str(port), "-t", "2",
                            "-c", "512", "-np", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
                break
            except Exception:
                if srv.poll() is not None:
                    raise SystemExit(f"llama-server could not load {path}")
                time.sleep(0.5)
        outs = []
        for p in prompts:
            body = json.dumps({"prompt": p, "n_predict": N_PREDICT, "temperature": 0, "top_k": 1,
                               "return_tokens": True, "ignore_eos": True, "cache_prompt": False}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", body,
                                         {"Content-Type": "application/json"})
            outs.append(json.loads(urllib.request.urlopen(req, timeout=120).read())["tokens"])
        return outs
    finally:
        srv.terminate()
        srv.wait()


def main():
    result = {"generator": "scripts/make_gpt_oss_quantize_greedy.py", "n_predict": N_PREDICT, "files": []}
    with tempfile.TemporaryDirectory() as tmp:
        for fixture, ty, exact in FILES:
            path = os.path.join(tmp, f"{fixture}-{ty}.gguf")
            subprocess.run([XLLM, "quantize", os.path.join(ROOT, "tests/fixtures", fixture), "--type", ty,
                            "-o", path], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            ps = prompts(fixture)
            entry = {"fixture": fixture, "type": ty, "exact": exact, "file_sha256": sha256(path), "prompts": ps,
                     "tokens": llama_greedy(path, ps)}
            result["files"].append(entry)
            print(fixture, ty, entry["tokens"])
    with open(OUT, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
