#!/usr/bin/env python3
"""`xllm quantize` against llama.cpp's pipeline on one real model, same source, same threads.

llama.cpp: convert_hf_to_gguf.py (--outtype bf16, lossless for a bf16 checkpoint) then
llama-quantize. xllm: `xllm quantize` straight from the safetensors folder, and from llama.cpp's
bf16 GGUF (the same file llama-quantize reads). For every type it prints one markdown row:

  - bytes: tensors of ours (from safetensors) equal to llama-quantize's, and whether our file
    made from the same GGUF is byte-identical to llama-quantize's (sha256);
  - size of our file / llama-quantize's;
  - perplexity of both files scored by llama-perplexity and by `xllm perplexity`, with the
    relative difference (budget: 0.5 %);
  - greedy tokens: llama.cpp (llama-server /completion, temperature 0) on our file vs on its own
    file, and `xllm run` on our file vs llama.cpp on it, for a few prompts.

`--speed` instead times llama-quantize and `xllm quantize` on the same f16 GGUF (the issue's
speed check) with the same thread count, interleaved (A B A B), and prints the medians as
tensors/s, MB/s (source bytes) and the ratio. Run it with no other benchmark on the machine.

Needs $XLLM_PEERS (default .peers/, see scripts/peers.sh): venv with torch/transformers/gguf and
llama.cpp built. The model defaults to models/smollm2-st (scripts/get_smollm2.sh, then
scripts/convert_smollm2_safetensors.py, which this script runs when the folder is missing).

A GGUF file as --model (e.g. models/gemma3/gemma-3-270m-q4_k_m.gguf) is a re-quantization source:
llama-quantize gets --allow-requantize and both read that one file.

Usage: python scripts/quantize_vs_llama_cpp.py [--model DIR|FILE.gguf] [--types Q4_K_M,Q6_K] [--threads 2]
       python scripts/quantize_vs_llama_cpp.py --speed [--repeats 3] [--source SMOLLM2-F16.gguf]
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.abspath(os.environ.get("XLLM_PEERS", os.path.join(ROOT, ".peers")))
LCPP = os.path.join(PEERS, "llama.cpp")
BIN = os.path.join(LCPP, "build", "bin")
PY = os.path.join(PEERS, "venv", "bin", "python")
XLLM = os.environ.get("XLLM", os.path.join(ROOT, os.environ.get("CARGO_TARGET_DIR", "target"), "release", "xllm"))
sys.path.insert(0, os.path.join(LCPP, "src", "gguf-py"))

DEFAULT_TYPES = ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
PROMPTS = ["The capital of France is", "Once upon a time, there was a",
           "def fibonacci(n):", "The three primary colors are"]
TEXT = os.path.join(ROOT, "tests/fixtures/texts/gpl3-excerpt.txt")


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def convert(model, outtype, dst):
    if not os.path.exists(dst):
        run([PY, os.path.join(LCPP, "src", "convert_hf_to_gguf.py"), model, "--outtype", outtype,
             "--outfile", dst])
    return dst


def tensor_hashes(path):
    import gguf
    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, hashlib.sha256(bytes(t.data.tobytes())).hexdigest()) for t in r.tensors}


def file_sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def llama_ppl(path, threads):
    out = run([os.path.join(BIN, "llama-perplexity"), "-m", path, "-f", TEXT, "-c", "512", "-t", str(threads)])
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    return float(m.group(1))


def xllm_ppl(path, threads):
    out = run([XLLM, "perplexity", path, "-f", TEXT, "--json", "--threads", str(threads)])
    return json.loads(out.stdout)["perplexity"]


def llama_greedy(path, threads, n=24):
    """Greedy token ids from llama-server for every prompt (EOS included when it stops there)."""
    port = 18000 + os.getpid() % 1000
    srv = subprocess.Popen([os.path.join(BIN, "llama-server"), "-m", path, "--port", str(port), "-t", str(threads),
                            "-c", "512", "-np", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
                break
            except Exception:
                time.sleep(0.5)
        outs = []
        for p in PROMPTS:
            body = json.dumps({"prompt": p, "n_predict": n, "temperature": 0, "return_tokens": True,
                               "cache_prompt": False}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", body,
                                         {"Content-Type": "application/json"})
            outs.append(json.loads(urllib.request.urlopen(req, timeout=120).read())["tokens"])
        return outs
    finally:
        srv.terminate()
        srv.wait()


def xllm_greedy(path, threads, n=24):
    outs = []
    for p in PROMPTS:
        out = run([XLLM, "run", path, p, "--raw", "--temperature", "0", "-n", str(n), "--format", "json",
                   "--threads", str(threads)])
        outs.append(json.loads(out.stdout)["tokens"])
    return outs


def common_prefix(a, b):
    """Tokens two greedy runs share before they first differ (summed over prompts)."""
    total = 0
    for x, y in zip(a, b):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        total += n
    return total


def smollm_copy(model, tmp):
    """A view of models/smollm2-st with SmolLM2's own pre-tokenizer (digits split one by one, then
    byte-level). transformers' GGUF loader (scripts/convert_smollm2_safetensors.py) writes a plain
    ByteLevel one, which tokenizes "\n\n  0" differently; convert_hf_to_gguf.py's tokenizer hash
    still calls it "smollm" while xllm quantize reads the patterns and says "gpt-2". The original
    checkpoint's tokenizer.json has the Digits step, which both name "smollm"."""
    with open(os.path.join(model, "tokenizer.json")) as f:
        tok = json.load(f)
    if tok.get("pre_tokenizer", {}).get("type") != "ByteLevel":
        return model
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, tok["pre_tokenizer"]]}
    out = os.path.join(tmp, "smollm2-st")
    os.makedirs(out)
    for name in os.listdir(model):
        if name != "tokenizer.json":  # hard links (xllm refuses symlinks leaving the folder), else copies
            try:
                os.link(os.path.join(model, name), os.path.join(out, name))
            except OSError:
                shutil.copy(os.path.join(model, name), os.path.join(out, name))
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        json.dump(tok, f)
    return out


def same_tokens(a, b):
    """Prompts whose greedy runs agree. llama-server lists the end token it stopped at, xllm does
    not: runs agree when one is the other plus at most that one token."""
    same = 0
    for x, y in zip(a, b):
        m = min(len(x), len(y))
        same += x[:m] == y[:m] and abs(len(x) - len(y)) <= 1
    return same


def quality(args):
    tmp = args.work
    if args.smollm_pre and os.path.basename(os.path.normpath(args.model)) == "smollm2-st":
        args.model = smollm_copy(args.model, tmp)
    gguf_source = os.path.isfile(args.model)  # re-quantization: llama-quantize --allow-requantize
    src = args.model if gguf_source else convert(args.model, "bf16", os.path.join(tmp, "source-bf16.gguf"))
    n, k = len(PROMPTS), len(PROMPTS) * args.n_predict
    print(f"model {args.model}; text {os.path.relpath(TEXT, ROOT)}; threads {args.threads}; "
          f"greedy: {n} prompts x {args.n_predict} tokens\n")
    print(f"| type | tensors = llama-quantize (from {'the GGUF' if gguf_source else 'safetensors'}) | file = llama-quantize (same GGUF) | size ours / theirs "
          "| llama-perplexity theirs → ours | xllm perplexity theirs → ours | greedy, llama.cpp: ours = theirs "
          "| greedy on ours: xllm = llama.cpp (tokens before first difference) |")
    print("|---|---|---|---|---|---|---|---|")
    for ty in args.types:
        theirs = os.path.join(tmp, f"llama-{ty}.gguf")
        ours = os.path.join(tmp, f"xllm-{ty}.gguf")
        ours_g = os.path.join(tmp, f"xllm-from-gguf-{ty}.gguf")
        flags = ["--allow-requantize"] if gguf_source else []
        run([os.path.join(BIN, "llama-quantize"), *flags, src, theirs, ty, str(args.threads)])
        run([XLLM, "quantize", args.model, "--type", ty, "-o", ours, "--threads", str(args.threads)])
        if not gguf_source:
            run([XLLM, "quantize", src, "--type", ty, "-o", ours_g, "--threads", str(args.threads)])
        ht, ho = tensor_hashes(theirs), tensor_hashes(ours)
        equal = sum(1 for k in ht if ho.get(k) == ht[k])
        file_same = file_sha(theirs) == file_sha(ours if gguf_source else ours_g)
        st, so = os.path.getsize(theirs), os.path.getsize(ours)
        lt, lo = llama_ppl(theirs, args.threads), llama_ppl(ours, args.threads)
        xt, xo = xllm_ppl(theirs, args.threads), xllm_ppl(ours, args.threads)
        gt = llama_greedy(theirs, args.threads, args.n_predict)
        go = llama_greedy(ours, args.threads, args.n_predict)
        gx = xllm_greedy(ours, args.threads, args.n_predict)
        print(f"| {ty} | {equal}/{len(ht)} | {'identical' if file_same else 'differs'} | {so / st:.5f} "
              f"| {lt:.4f} → {lo:.4f} ({(lo / lt - 1) * 100:+.3f} %) | {xt:.4f} → {xo:.4f} ({(xo / xt - 1) * 100:+.3f} %) "
              f"| {same_tokens(gt, go)}/{n} prompts | {same_tokens(gx, go)}/{n} prompts ({common_prefix(gx, go)}/{k} tokens) |",
              flush=True)
        for f in (theirs, ours, ours_g):
            if os.path.exists(f):
                os.remove(f)


def speed(args):
    tmp = args.work
    src = args.source or convert(args.model, "f16", os.path.join(tmp, "source-f16.gguf"))
    import gguf
    r = gguf.GGUFReader(src)
    n_tensors = len(r.tensors)
    src_bytes = sum(int(t.n_bytes) for t in r.tensors)
    del r
    print(f"source {src}: {n_tensors} tensors, {src_bytes / 1e6:.1f} MB f16; threads {args.threads}; "
          f"median of {args.repeats} interleaved runs (wall s); load average {os.getloadavg()[0]:.1f}\n")
    print("| type | llama-quantize s | xllm quantize s | llama tensors/s | xllm tensors/s | llama MB/s | xllm MB/s | xllm speed / llama |")
    print("|---|---|---|---|---|---|---|---|")
    import statistics
    for ty in args.types:
        out = os.path.join(tmp, f"speed-{ty}.gguf")

        def once(cmd):
            t0 = time.perf_counter()
            run(cmd)
            dt = time.perf_counter() - t0
            os.remove(out)
            return dt

        llama = [os.path.join(BIN, "llama-quantize"), src, out, ty, str(args.threads)]
        ours = [XLLM, "quantize", src, "--type", ty, "-o", out, "--threads", str(args.threads)]
        tl, tx = [], []
        for _ in range(args.repeats):  # A B A B: both tools see the same machine load
            tl.append(once(llama))
            tx.append(once(ours))
        tl, tx = statistics.median(tl), statistics.median(tx)
        print(f"| {ty} | {tl:.2f} | {tx:.2f} | {n_tensors / tl:.1f} | {n_tensors / tx:.1f} | {src_bytes / 1e6 / tl:.1f} "
              f"| {src_bytes / 1e6 / tx:.1f} | {tl / tx:.2f}x |", flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "models/smollm2-st"))
    ap.add_argument("--types", default=",".join(DEFAULT_TYPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--source", default=None,
                    help="--speed: an f16 GGUF made beforehand (convert_hf_to_gguf.py --outtype f16), so the "
                         "conversion stays out of the timed, quiet part")
    ap.add_argument("--work", default=None, help="folder for the GGUF files (default: a temp folder)")
    ap.add_argument("--n-predict", type=int, default=24)
    ap.add_argument("--keep-pretokenizer", dest="smollm_pre", action="store_false",
                    help="use the model's tokenizer.json as is (see smollm_copy)")
    args = ap.parse_args()
    args.types = [t.strip() for t in args.types.split(",") if t.strip()]
    if not os.path.exists(args.model):
        if args.model != os.path.join(ROOT, "models/smollm2-st"):
            sys.exit(f"no model folder {args.model}")
        run(["bash", os.path.join(ROOT, "scripts/get_smollm2.sh")])
        run([PY, os.path.join(ROOT, "scripts/convert_smollm2_safetensors.py")])
    for tool in ("llama-quantize", "llama-perplexity", "llama-server"):
        if not os.path.exists(os.path.join(BIN, tool)):
            sys.exit(f"{tool} not built in {BIN}: run scripts/peers.sh llama.cpp")
    if not os.path.exists(XLLM):
        sys.exit(f"{XLLM} missing: cargo build --release")
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        args.work = tmp
        (speed if args.speed else quality)(args)


if __name__ == "__main__":
    main()
